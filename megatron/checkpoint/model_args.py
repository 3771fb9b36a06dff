"""A checkpoint's saved `args` <-> the model: the one mapping between Megatron's flag names and
`TransformerConfig`, the model built from them, and whether a checkpoint's model fits this run's.

    ckpt["args"] = {"num_layers": 24, "hidden_size": 1024, "padded_vocab_size": 50304,
                    "norm_epsilon": 1e-5, "disable_bias_linear": False, "model_type": "bert", ...}
        -> transformer_config_from_args -> TransformerConfig(num_layers=24, vocab_size=50304,
                                                             layernorm_epsilon=1e-5, add_bias_linear=True,
                                                             causal=False, ...)

Flag names follow Megatron (the trainer saves `vars(args)`); where the config's field has another name
or meaning, `RENAMED` says so. A flag the args do not hold (an older checkpoint) takes the dataclass's
own default: no default is written twice. `num_query_groups` counts only with `group_query_attention`
(Megatron saves its default 1 either way). BERT checkpoints say `model_type: "bert"` (bidirectional
encoder) and `bert_binary_head` (pooler and SOP head; absent means present, as on the command line).
"""

import contextlib
from typing import Mapping, Optional

import torch

from megatron.core.errors import UserError
from megatron.core.models.bert import BertModel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.config import TransformerConfig

# flags stored under the config's own field name
SAME_NAME = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "max_position_embeddings",
             "ffn_hidden_size", "position_embedding_type", "rotary_base", "rotary_percent", "normalization", "swiglu",
             "openai_gelu",
             "hidden_dropout", "attention_dropout", "init_method_std", "untie_embeddings_and_output_weights")
# flag -> config field
RENAMED = {"padded_vocab_size": "vocab_size", "norm_epsilon": "layernorm_epsilon"}
REQUIRED = ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "padded_vocab_size")


def transformer_config_from_args(args: Mapping, **overrides) -> TransformerConfig:
    """The model's config from Megatron-named flags; `overrides` are config fields (`vocab_size=...`,
    `hidden_dropout=0.0`) that win over the args. Flags absent from `args` (or None) are not passed."""
    given = {k: v for k, v in args.items() if v is not None}
    fields = {k: given[k] for k in SAME_NAME if k in given}
    fields.update({field: given[flag] for flag, field in RENAMED.items() if flag in given})
    if "disable_bias_linear" in given:
        fields["add_bias_linear"] = not given["disable_bias_linear"]
    if given.get("group_query_attention"):
        fields["num_query_groups"] = given.get("num_query_groups", 1)
    if given.get("model_type") == "bert":
        fields["causal"] = False
    fields.update(overrides)
    missing = [k for k in REQUIRED if RENAMED.get(k, k) not in fields]
    if missing:
        raise UserError(f"the checkpoint's args lack {', '.join(missing)}; it was not written by this project")
    return TransformerConfig(**fields)


def args_from_transformer_config(config: TransformerConfig) -> dict:
    """The inverse: the config as Megatron-named flags (plus `model_type: "bert"` for an encoder)."""
    args = {k: getattr(config, k) for k in SAME_NAME}
    args.update({flag: getattr(config, field) for flag, field in RENAMED.items()})
    args["disable_bias_linear"] = not config.add_bias_linear
    args["group_query_attention"] = config.num_query_groups != config.num_attention_heads
    args["num_query_groups"] = config.num_query_groups if args["group_query_attention"] else None
    if not config.causal:
        args["model_type"] = "bert"
    return args


def build_model_from_args(args: Mapping, pre_process: bool = True, post_process: bool = True, layer_offset: int = 0,
                          num_local_layers: Optional[int] = None, device=None, **overrides):
    """One pipeline stage (the whole model with the defaults) of the GPT or BERT the args describe.

    `device="meta"` builds the parameters without memory and without drawing initial weights (their
    shapes and tensor-parallel tags are all the checkpoint tools read); otherwise the model is
    initialized as the trainer initializes it. `overrides` go to `transformer_config_from_args`.
    """
    config = transformer_config_from_args(args, **overrides)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        if args.get("model_type") == "bert":
            return BertModel(config, pre_process, post_process, layer_offset, num_local_layers,
                             add_binary_head=bool(args.get("bert_binary_head", True)))
        return GPTModel(config, pre_process, post_process, layer_offset, num_local_layers)


# ---- does a checkpoint's model fit this run's? -------------------------------------------------------
# Flags a checkpoint's model must share with the run that loads it (shape and meaning of the weights);
# the position flags only where the position embedding uses them (rope has no table, learned no base).
MODEL_FLAGS = ("num_layers", "hidden_size", "num_attention_heads", "group_query_attention", "ffn_hidden_size",
               "position_embedding_type",
               "normalization", "norm_epsilon", "swiglu", "openai_gelu", "disable_bias_linear",
               "untie_embeddings_and_output_weights", "padded_vocab_size", "true_vocab_size", "bert_binary_head")
POSITION_FLAGS = {"learned_absolute": ("max_position_embeddings",), "rope": ("rotary_base", "rotary_percent")}


def _flag_text(key: str, saved, here) -> str:
    if key == "bert_binary_head":  # store_false flag: name the flag the user types
        return f"--bert-no-binary-head {not saved!r} in the checkpoint, {not here!r} here"
    name = key if key.endswith("vocab_size") else "--" + key.replace("_", "-")
    return f"{name} {saved!r} in the checkpoint, {here!r} here"


def _with_default_ffn(args: Mapping) -> Mapping:
    """`args` with ffn_hidden_size filled in when it is None (not given: 4h, or the SwiGLU size), as the
    model fills it: Megatron-LM records the size it derived, our runs the flag as given."""
    if args.get("ffn_hidden_size") is not None or not args.get("hidden_size") or not args.get("num_attention_heads"):
        return args
    config = TransformerConfig(num_layers=1, hidden_size=args["hidden_size"], seq_length=1, vocab_size=1,
                               num_attention_heads=args["num_attention_heads"], swiglu=bool(args.get("swiglu")))
    return {**args, "ffn_hidden_size": config.ffn_hidden_size}


def check_model_flags(saved: Mapping, here: Mapping, where: str) -> None:
    """Every model flag that differs between a checkpoint's saved args and this run's (both Megatron-named
    dicts), in one line (not only the first). Flags either side does not record (older checkpoints) are
    not compared; an FFN size not given compares as the size the model derives."""
    saved, here = _with_default_ffn(saved), _with_default_ffn(here)
    keys = MODEL_FLAGS + POSITION_FLAGS.get(here.get("position_embedding_type"), ())
    if here.get("group_query_attention") and saved.get("group_query_attention"):
        keys += ("num_query_groups",)  # saved (default 1) but unused without grouped-query attention
    differ = [(k, saved[k], here[k]) for k in keys if k in saved and k in here and saved[k] != here[k]]
    if differ:
        text = "; ".join(_flag_text(*d) for d in differ)
        raise UserError(f"{where} has another model: {text}; use the checkpoint's model flags")


def describe_state_dict_mismatch(expected: Mapping, saved: Mapping, limit: int = 3) -> str:
    """Why `saved` does not load into a model whose state dict is `expected`, in one line: missing and
    unexpected keys and differing shapes, `limit` of each, then how many more."""
    def few(items):
        return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")

    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    shapes = [f"{k} {list(saved[k].shape)} in the checkpoint, {list(v.shape)} here" for k, v in expected.items()
              if k in saved and hasattr(saved[k], "shape") and tuple(saved[k].shape) != tuple(v.shape)]
    parts = [f"{what} {few(items)}" for what, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                                        ("shapes differ:", shapes)) if items]
    return "; ".join(parts)
