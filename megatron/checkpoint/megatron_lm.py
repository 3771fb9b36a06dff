"""Checkpoints written by Megatron-LM (or Megatron-DeepSpeed) in the legacy `torch` format, read as ours.

The folders are ours already (naming.py: tracker, `iter_XXXXXXX/mp_rank_XX[_YYY]/model_optim_rng.pt`,
stage-local layer numbers, the same TP splits); what differs is inside each rank's file:

    Megatron-LM                                            -> import_checkpoint ->   ours
    "args": argparse.Namespace(num_layers=24, add_bias_linear=False, ...)           {"num_layers": 24,
                                                                                     "disable_bias_linear": True, ...}
    "model": {megatron-core names; with TransformerEngine the norms fused into the next linear and
              `*._extra_state` entries; Megatron-DeepSpeed: the legacy model's nested names}   {our names}
    "iteration", "checkpoint_version" (>= 2.0: QKV rows per query group, as ours)    kept
    "optimizer", "opt_param_scheduler", "rng_state", ...                              dropped (named in IMPORTED)

1. The pickle (protocol.torch_load). A Megatron-LM file holds an `argparse.Namespace` (args), Megatron's
   enums (`args.model_type`, `args.attention_backend`), numpy arrays (`rng_state`) and, from older
   TransformerEngine, `io.BytesIO` (fp8 metadata in `_extra_state`). `argparse.Namespace` is allowed as
   itself (unpickling only fills its `__dict__`). Every other one of those globals is replaced by an
   inert `ForeignValue` that records the arguments it was built with: the foreign class is never imported
   and none of its code runs. Any other global (`posix.system`, ...) is refused, as for our own files.
2. The args (`args_from_megatron`): Megatron's flag names are mostly ours; where they differ the
   mapping below says so (e.g. its GELU fused with the bias is tanh-approximated: our `openai_gelu`).
   A feature this project does not have is refused, all of them in one line (`lacking`).
3. The names (`model_from_megatron`): megatron-core's local spec uses our names; TransformerEngine's
   spec fuses the norm into the following linear (`TE_FUSED_NORMS`); the legacy model has its own names
   (`LEGACY_*`). `_extra_state` (TransformerEngine's fp8 scaling state, None without it) is dropped.
   QKV rows are `[G, nh/G + 2, hd]` in both projects (Megatron's `get_query_key_value_tensors` and ours
   split the rows the same way), so no tensor is reordered; SwiGLU's fc1 holds [gate; up] in both.

Only the weights are taken: the trainer loads such a checkpoint with `--finetune` (or continues its
iteration count with `--no-load-optim --no-load-rng`); tools/checkpoint_util.py writes it in our format.
"""

import argparse
import functools
import os
import re
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from megatron.core.errors import UserError

IMPORTED = "imported_from"  # top-level key of an imported file (in memory only; never written back)
SOURCE = "Megatron-LM"

# ---- 1. what a Megatron-LM pickle may hold ------------------------------------------------------------
NAMESPACE = "argparse.Namespace"
_NUMPY = {f"numpy.{m}.{n}" for m in ("core.multiarray", "_core.multiarray") for n in ("_reconstruct", "scalar")}
_NUMPY |= {"numpy.ndarray", "numpy.dtype"}


def is_foreign_data(name: str) -> bool:
    """Globals of a Megatron-LM file that are data, read as inert `ForeignValue`s: Megatron's (or
    Megatron-DeepSpeed's) own values, numpy arrays and dtypes (RNG states), io.BytesIO (TE's fp8 state)."""
    return (name.startswith("megatron.") or name in _NUMPY or name.startswith("numpy.dtypes.")
            or name == "_io.BytesIO")


class ForeignValue:
    """A pickled object of a foreign class kept as data: the arguments and state the pickle gave it.
    Its class is never imported and none of its code runs; `value` is an enum member's value."""

    global_name = "?"

    def __new__(cls, *args):
        obj = super().__new__(cls)
        obj.args, obj.state = args, None
        return obj

    def __init__(self, *args):
        pass

    def __setstate__(self, state):
        self.state = state

    @property
    def value(self):
        return self.args[0] if len(self.args) == 1 else None

    def __repr__(self):
        return f"<{self.global_name}{self.args!r}>"


@functools.lru_cache(maxsize=None)
def _stand_in(name: str) -> type:
    return type(f"ForeignValue[{name}]", (ForeignValue,), {"global_name": name})


def refused_globals(names: Sequence[str]) -> List[str]:
    """The globals (outside torch's own allowlist) that no checkpoint may hold: they could run code."""
    return [n for n in names if n != NAMESPACE and not is_foreign_data(n)]


def safe_globals(names: Sequence[str]) -> list:
    """For torch.serialization.safe_globals: argparse.Namespace itself, an inert stand-in for the rest."""
    return [argparse.Namespace] + [(_stand_in(n), n) for n in names if is_foreign_data(n)]


# ---- 2. args --------------------------------------------------------------------------------------------
def _on(v) -> bool:
    return v not in (None, False, 0, 0.0, "", [], ())


# (flag, is the feature in use, what it is): what this project's GPT does not have
LACKING: Tuple[Tuple[str, Callable, str], ...] = (
    ("num_experts", _on, "mixture of experts"),
    ("num_moe_experts", _on, "mixture of experts"),
    ("multi_latent_attention", _on, "multi-latent attention"),
    ("experimental_attention_variant", _on, "an experimental attention variant"),
    ("linear_attention_freq", _on, "linear attention layers"),
    ("is_hybrid_model", _on, "Mamba hybrid layers"),
    ("hybrid_layer_pattern", _on, "Mamba hybrid layers"),
    ("hybrid_override_pattern", _on, "Mamba hybrid layers"),
    ("heterogeneous_layers_config_path", _on, "heterogeneous layers"),
    ("heterogeneous_layers_config_encoded_json", _on, "heterogeneous layers"),
    ("mtp_num_layers", _on, "multi-token prediction"),
    ("qk_layernorm", _on, "query/key layernorm"),
    ("qk_l2_norm", _on, "query/key L2 norm"),
    ("attention_output_gate", _on, "an attention output gate"),
    ("softmax_type", lambda v: v not in (None, "vanilla"), "another softmax"),
    ("softmax_scale", _on, "a custom softmax scale"),
    ("window_size", _on, "sliding-window attention"),
    ("rotary_interleaved", _on, "interleaved RoPE"),
    ("use_rope_scaling", _on, "Llama-3.1 RoPE scaling"),
    ("rotary_seq_len_interpolation_factor", lambda v: v not in (None, 1), "RoPE interpolation"),
    ("no_rope_freq", _on, "layers without RoPE"),
    ("apply_residual_connection_post_layernorm", _on, "post-norm residuals"),
    ("layernorm_zero_centered_gamma", _on, "zero-centred norm weights"),
    ("apply_layernorm_1p", _on, "zero-centred norm weights"),
    ("squared_relu", _on, "squared ReLU"),
    ("quick_geglu", _on, "quick GEGLU"),
    ("glu_linear_offset", _on, "a GLU offset"),
    ("activation_func_clamp_value", _on, "clamped activations"),
    ("use_mup", _on, "muP scaling"),
    ("enable_mhc_connections", _on, "hyper-connections"),
    ("num_layers_per_virtual_pipeline_stage", _on, "virtual pipeline stages"),
    ("virtual_pipeline_model_parallel_size", lambda v: v not in (None, 1), "virtual pipeline stages"),
    ("decoder_first_pipeline_num_layers", _on, "uneven pipeline stages"),
    ("decoder_last_pipeline_num_layers", _on, "uneven pipeline stages"),
    ("num_layers_in_first_pipeline_stage", _on, "uneven pipeline stages"),
    ("num_layers_in_last_pipeline_stage", _on, "uneven pipeline stages"),
    ("pipeline_model_parallel_layout", _on, "uneven pipeline stages"),
    ("account_for_embedding_in_pipeline_split", _on, "uneven pipeline stages"),
    ("account_for_loss_in_pipeline_split", _on, "uneven pipeline stages"),
)
POSITIONS = ("learned_absolute", "rope", "none")
# Megatron-DeepSpeed's PositionEmbeddingType enum (an int value); other forks store the name as the value
_DEEPSPEED_POSITIONS = {1: "rope", 2: "learned_absolute", 3: "alibi"}
# flags copied as they are: the layout, the vocabulary padding and the tokenizer (same names and meaning)
COPIED = ("seq_length", "max_position_embeddings", "rotary_base", "rotary_percent", "init_method_std",
          "hidden_dropout", "attention_dropout", "padded_vocab_size", "make_vocab_size_divisible_by",
          "tensor_model_parallel_size", "pipeline_model_parallel_size", "tokenizer_type", "vocab_file",
          "merge_file", "tokenizer_model", "vocab_size", "fp16", "bf16")


def _flag(name: str, value) -> str:
    shown = getattr(value, "global_name", None) or repr(value)
    return f"--{name.replace('_', '-')} {shown}"


def _position_type(a: Mapping) -> Optional[str]:
    pos = a.get("position_embedding_type")
    if isinstance(pos, ForeignValue):  # Megatron-DeepSpeed's enum
        pos = pos.value if isinstance(pos.value, str) else _DEEPSPEED_POSITIONS.get(pos.value, repr(pos))
    if a.get("use_rotary_position_embeddings"):  # the older flag
        pos = "rope"
    return pos or "learned_absolute"


def lacking(a: Mapping) -> List[str]:
    """What the Megatron-LM model of args `a` uses that this project's GPT does not have, as flags."""
    found = [f"{what} ({_flag(flag, a[flag])})" for flag, used, what in LACKING if used(a.get(flag))]
    pos = _position_type(a)
    if pos not in POSITIONS:
        found.append(f"{pos} position embeddings (--position-embedding-type {pos})")
    if a.get("normalization") not in (None, "LayerNorm", "RMSNorm"):
        found.append(f"{a['normalization']} (--normalization)")
    if a.get("gated_linear_unit") and not a.get("swiglu"):
        found.append("a gated linear unit other than SwiGLU (--gated-linear-unit)")
    if a.get("add_qkv_bias") and a.get("add_bias_linear") is False:
        found.append("a QKV bias without the other linear biases (--add-qkv-bias --disable-bias-linear)")
    heads, hidden, kv = a.get("num_attention_heads"), a.get("hidden_size"), a.get("kv_channels")
    if kv is not None and heads and hidden and kv * heads != hidden:
        found.append(f"a head dimension other than hidden/heads (--kv-channels {kv})")
    model_type = a.get("model_type")
    if isinstance(model_type, ForeignValue) and model_type.value not in (None, 1):  # 1: encoder_or_decoder
        found.append(f"an encoder-decoder model ({model_type!r})")
    return list(dict.fromkeys(found))


def _plain(name: str, value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise UserError(f"args.{name} of the Megatron-LM checkpoint holds {value!r}, not a plain value")


def args_from_megatron(a: Mapping) -> dict:
    """Our args (Megatron flag names, plain values) from a Megatron-LM checkpoint's `vars(args)`. Call
    `lacking` first: what it lists is not mapped."""
    heads = a.get("num_attention_heads")
    groups = a.get("num_query_groups") if a.get("group_query_attention") else None
    if groups is None and a.get("num_key_value_heads") not in (None, heads):  # Megatron-DeepSpeed's flag
        groups = a["num_key_value_heads"]
    eps = next((a[k] for k in ("layernorm_epsilon", "norm_epsilon") if a.get(k) is not None), 1e-5)
    bias = a.get("add_bias_linear")  # Megatron: --disable-bias-linear stores add_bias_linear=False
    if bias is None:
        bias = not a.get("disable_bias_linear")  # both projects' default: biases
    swiglu = bool(a.get("swiglu"))
    # Megatron's GELU is tanh-approximated with --openai-gelu, and also where it fuses the bias into the
    # activation (bias_gelu_fusion: on by default, turned off without biases): both are our --openai-gelu
    tanh_gelu = not swiglu and bool(a.get("openai_gelu") or (a.get("bias_gelu_fusion") and bias))
    out = {
        "num_layers": a.get("num_layers"), "hidden_size": a.get("hidden_size"), "num_attention_heads": heads,
        "ffn_hidden_size": a.get("ffn_hidden_size"),
        "group_query_attention": groups is not None, "num_query_groups": groups,
        "position_embedding_type": _position_type(a),
        "normalization": a.get("normalization") or "LayerNorm", "norm_epsilon": eps,
        "swiglu": swiglu, "openai_gelu": tanh_gelu,
        "disable_bias_linear": not bias,
        "untie_embeddings_and_output_weights": bool(a.get("untie_embeddings_and_output_weights")),
    }
    out.update({k: a[k] for k in COPIED if a.get(k) is not None})
    return {k: _plain(k, v) for k, v in out.items()}


# ---- 3. parameter names ---------------------------------------------------------------------------------
TE_FUSED_NORMS = {  # TransformerEngine's LayerNormLinear holds the norm of its input
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.linear_qkv.layer_norm_bias": "input_layernorm.bias",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
    "mlp.linear_fc1.layer_norm_bias": "pre_mlp_layernorm.bias",
}
LEGACY_LAYER = {  # Megatron-LM's legacy model and Megatron-DeepSpeed: a layer's modules
    "input_layernorm": "input_layernorm", "input_norm": "input_layernorm",
    "self_attention.query_key_value": "self_attention.linear_qkv", "self_attention.dense": "self_attention.linear_proj",
    "post_attention_layernorm": "pre_mlp_layernorm", "post_attention_norm": "pre_mlp_layernorm",
    "mlp.dense_h_to_4h": "mlp.linear_fc1", "mlp.dense_4h_to_h": "mlp.linear_fc2",
}
LEGACY_TOP = {  # ... and the rest; `word_embeddings_for_head`: the last stage's copy of tied embeddings
    "language_model.embedding.word_embeddings": "embedding.word_embeddings",
    "language_model.embedding.position_embeddings": "embedding.position_embeddings",
    "language_model.output_layer": "output_layer", "word_embeddings_for_head": "output_layer",
}
_LEGACY_BLOCK = re.compile(r"^language_model\.(?:encoder|transformer)\.")
_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_DROPPED = re.compile(r"(^|\.)(_extra_state|rotary_pos_emb\.inv_freq)$")  # TE's fp8 state; RoPE's table


def _flatten(d: Mapping, prefix: str = "") -> Dict[str, object]:
    """The legacy model saves nested dicts ({"language_model": {"encoder": {...}}}): dotted names."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def our_name(name: str) -> str:
    """Our name for a Megatron-LM parameter name (megatron-core local or TE spec, or the legacy model)."""
    if name.startswith(("language_model.", "word_embeddings_for_head.")):
        block = _LEGACY_BLOCK.sub("decoder.", name)
        if block != name:
            name = block.replace("decoder.final_norm.", "decoder.final_layernorm.")
            m = _LAYER.match(name)
            if m and m[2] in LEGACY_LAYER:
                name = f"decoder.layers.{m[1]}.{LEGACY_LAYER[m[2]]}.{m[3]}"
        else:
            module, _, leaf = name.rpartition(".")
            name = f"{LEGACY_TOP.get(module, module)}.{leaf}"
    m = re.match(r"^(decoder\.layers\.\d+\.)(.+)$", name)
    if m and m[2] in TE_FUSED_NORMS:
        name = m[1] + TE_FUSED_NORMS[m[2]]
    return name


def model_from_megatron(model: Mapping, where: str) -> Tuple[dict, int]:
    """Our state dict from a Megatron-LM one; returns it and the number of `_extra_state` entries dropped."""
    out, dropped = {}, 0
    for name, value in _flatten(model).items():
        if _DROPPED.search(name):
            dropped += 1
            continue
        if not isinstance(value, torch.Tensor):
            raise UserError(f"{where}: parameter {name} holds {value!r}, not a tensor")
        ours = our_name(name)
        if ours in out:
            raise UserError(f"{where}: parameters {name} and another both map to {ours}")
        out[ours] = value
    return out, dropped


def _check_names(model: Mapping, args: dict, where: str) -> None:
    """Every parameter must be one the GPT of `args` has (layer numbers aside): names that are not are
    modules this project lacks, refused here rather than as a shape or key mismatch further on."""
    from megatron.checkpoint.layout import ModelLayout  # builds the model on the meta device

    known = {re.sub(r"\.layers\.\d+\.", ".layers.N.", k) for k in ModelLayout(args).keys}
    known.add("output_layer.weight")  # a tied model's copy on the last pipeline stage
    unknown = [k for k in model if re.sub(r"\.layers\.\d+\.", ".layers.N.", k) not in known]
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise UserError(f"refused {where}: parameters {', '.join(unknown[:3])}{more} have no counterpart in this "
                        "project's GPT of the same flags")


# ---- the whole checkpoint --------------------------------------------------------------------------------
def other_format_hint(folder: str) -> str:
    """How to read an iteration folder that a `torch`-format reader cannot ("" for any other folder):
    Megatron-LM's `torch_dist` (its default: `*.distcp` shards, `metadata.json` and a pickled `common.pt`,
    whose key layout differs from ours), or our own `torch_dist` (`common.json`) in a legacy-only place."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    if "common.json" in names:
        return ("; it is a megatron-ltd torch_dist checkpoint: --load, evaluation and export read it as it is, "
                "and tools/checkpoint_util.py --merge (or --target-*-parallel-size) writes the legacy files")
    if "metadata.json" in names or "common.pt" in names or any(n.endswith(".distcp") for n in names):
        return ("; it is Megatron-LM's torch_dist format: re-save it in the torch format with Megatron-LM "
                "(--ckpt-convert-format torch --ckpt-convert-save DIR) and load that")
    return ""


RELEASE_HINT = ("a Megatron-LM release checkpoint: rename its release/ folder to iter_0000000 and write 0 into "
                "the tracker")


def is_megatron_lm(ckpt) -> bool:
    return isinstance(ckpt, dict) and isinstance(ckpt.get("args"), argparse.Namespace)


def import_checkpoint(ckpt, path: str):
    """A rank file of Megatron-LM as one of ours (see the module docstring); any other object unchanged.
    What has no equivalent here is a UserError naming all of it in one line."""
    if not is_megatron_lm(ckpt):
        return ckpt
    where = f"{SOURCE} checkpoint {path}"
    a = vars(ckpt["args"])
    problems = lacking(a)
    if "model" not in ckpt and any(re.fullmatch(r"model\d+", k) for k in ckpt):
        problems.append("virtual pipeline stages (model0, model1, ...)")
    version = ckpt.get("checkpoint_version")
    if not isinstance(version, (int, float)) or version < 2.0:
        problems.append(f"checkpoint_version {version} (before 2.0 the QKV rows were ordered otherwise; load and "
                        "re-save it with Megatron-LM first)")
    if problems:
        raise UserError(f"refused {where}: it uses {', '.join(problems)}, which this project's GPT does not have")
    if not isinstance(ckpt.get("model"), Mapping):
        raise UserError(f"{where} holds no model state dict")
    args = args_from_megatron(a)
    model, extra_states = model_from_megatron(ckpt["model"], where)
    _check_names(model, args, where)
    iteration = int(ckpt.get("iteration") or 0)
    samples = {k: int(a.get(k) or 0) for k in ("consumed_train_samples", "consumed_valid_samples")}
    dropped = sorted(k for k in ckpt if k not in ("args", "model", "iteration", "checkpoint_version"))
    return {"args": args, "model": model, "iteration": iteration, "checkpoint_version": float(version),
            "train_state": {"iteration": iteration, **samples}, **samples,
            IMPORTED: {"source": SOURCE, "dropped": dropped, "extra_states": extra_states}}
