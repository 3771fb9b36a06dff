"""How a checkpoint's model is laid out over TP x PP, read off the model itself: split and merge.

    unsharded state dict (TP=1 PP=1)            {(tp_rank, stage): that rank's state dict}
    global layer numbers, whole tensors   <->   local layer numbers, TP shards
                             merge_model <-  -> split_model

Nothing here lists parameter names. `ModelLayout` builds the model a checkpoint's `args` describe on
the meta device (`model_args.build_model_from_args`: no memory, no initial weights), whole and one
pipeline stage at a time, and reads off each parameter:
  - its full shape (`full_shape` of its tensor-parallel tags);
  - how tensor parallelism splits it: the tags `tensor_model_parallel`, `partition_dim` and
    `partition_stride` that megatron/core/tensor_parallel puts on every parameter (stride 2: SwiGLU's
    fc1 holds [gate; up], and each rank keeps its slice of both);
  - which stage holds it, under which local name: the stage model's own parameters, mapped to the
    unsharded names by `LanguageModule.global_param_name` (layer offset). With tied embeddings and
    PP > 1 the last stage's `output_layer.weight` (tagged `shared_embedding`) is a copy of the word
    embeddings: dropped on merge, re-made on split.
So the flags that change the set of parameters (rope has no position table, --disable-bias-linear,
RMSNorm has no bias, BERT with or without its binary head) are answered by the model those args build,
and a key that model does not have is refused: taking TP rank 0's copy of a tensor that is really
sharded would silently produce a wrong model. Replicated tensors are taken from TP rank 0 (training
keeps the copies equal).
"""

import re
from typing import Dict, List, Optional, Tuple

import torch

from megatron.checkpoint.model_args import build_model_from_args, transformer_config_from_args
from megatron.core import parallel_state
from megatron.core.errors import UserError
from megatron.core.tensor_parallel.sharding import full_shape, merge_shards, shard_tensor

Rank = Tuple[int, int]  # (tensor-parallel rank, pipeline stage)
Spec = Optional[Tuple[int, int]]  # (partition dim, stride); None: every TP rank holds the whole tensor
WORD_EMBEDDINGS = "embedding.word_embeddings.weight"
POSITION_EMBEDDINGS = "embedding.position_embeddings.weight"
VOCAB_KEYS = (WORD_EMBEDDINGS, "output_layer.weight")  # [V, h]: rows padded to a multiple that depends on TP
VOCAB_BIASES = ("output_layer.bias",)  # [V], BERT's MLM logits
_LAYER_KEY = re.compile(r"^(?P<block>decoder|encoder)\.layers\.(?P<i>\d+)\.(?P<name>.+)$")


def partition_spec(param: torch.Tensor) -> Spec:
    """(partition dim, stride) from a parameter's tensor-parallel tags; None when it is replicated."""
    if not getattr(param, "tensor_model_parallel", False):
        return None
    return param.partition_dim, param.partition_stride


class ModelLayout:
    """The parameters of the model a checkpoint's args describe: names, full shapes, TP splits, stages.

    Only num_layers, hidden_size and num_attention_heads must be in the args. Sizes the args do not
    record are taken from the tensors: the padded vocabulary from the word embeddings' rows
    (`vocab_rows`), the position table's size from its rows (`position_rows`).
    """

    def __init__(self, args: dict, vocab_rows: Optional[int] = None, position_rows: Optional[int] = None):
        missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads") if args.get(k) is None]
        if missing:
            raise UserError(f"the checkpoint's args lack {', '.join(missing)}; it was not written by this project")
        vocab = args.get("padded_vocab_size") or vocab_rows
        if vocab is None:
            raise UserError(f"the model has no {WORD_EMBEDDINGS}")
        positions = args.get("max_position_embeddings") or position_rows or args.get("seq_length") or 1
        # seq_length and dropout do not change a parameter: fixed so that any saved values validate
        self._overrides = dict(vocab_size=int(vocab), max_position_embeddings=int(positions), seq_length=1,
                               hidden_dropout=0.0, attention_dropout=0.0)
        self.args = args
        self.config = transformer_config_from_args(args, **self._overrides)
        self.num_layers = self.config.num_layers
        whole = self._build(0, 1)
        tp = parallel_state.get_tensor_model_parallel_world_size()  # 1 in the tools; the tags give full sizes
        self.shapes = {k: tuple(full_shape(p, tp)) for k, p in whole.named_parameters()}  # the model's order
        self.specs = {k: partition_spec(p) for k, p in whole.named_parameters()}
        self.kind = type(whole).__name__

    def _build(self, stage: int, pp: int):
        per_stage = self.num_layers // pp
        return build_model_from_args(self.args, pre_process=stage == 0, post_process=stage == pp - 1,
                                     layer_offset=stage * per_stage, num_local_layers=per_stage, device="meta",
                                     **self._overrides)

    @classmethod
    def of_model(cls, args: dict, model: dict) -> "ModelLayout":
        """For an unsharded state dict: sizes the args do not record are read from its tensors."""
        rows = {k: model[k].shape[0] if k in model else None for k in (WORD_EMBEDDINGS, POSITION_EMBEDDINGS)}
        return cls(args, rows[WORD_EMBEDDINGS], rows[POSITION_EMBEDDINGS])

    @classmethod
    def of_shards(cls, args: dict, shards: Dict[Rank, dict], tp: int) -> "ModelLayout":
        first = [shards[(t, 0)] for t in range(tp)]
        vocab = sum(s[WORD_EMBEDDINGS].shape[0] for s in first) if all(WORD_EMBEDDINGS in s for s in first) else None
        positions = first[0][POSITION_EMBEDDINGS].shape[0] if POSITION_EMBEDDINGS in first[0] else None
        return cls(args, vocab, positions)

    @property
    def keys(self) -> List[str]:
        """The unsharded model's keys, in the order the model registers them (GPTModel, BertModel)."""
        return list(self.shapes)

    def spec(self, key: str) -> Spec:
        """How TP splits the unsharded parameter `key`; an unknown key is a UserError."""
        if key not in self.specs:
            raise UserError(f"unknown parameter {key!r} in the checkpoint; the {self.kind} its args describe has "
                            "no such parameter, so how it is split across tensor-parallel ranks is unknown")
        return self.specs[key]

    def stage(self, stage: int, pp: int) -> Dict[str, Tuple[str, Spec, bool]]:
        """{local key: (unsharded key, spec, is the tied copy)} of pipeline stage `stage` of `pp`, in the
        unsharded model's order, the last stage's copy of tied word embeddings last."""
        model = self._build(stage, pp)
        entries = [(local, (model.global_param_name(local), partition_spec(p), getattr(p, "shared_embedding", False)))
                   for local, p in model.named_parameters()]
        entries.sort(key=lambda e: e[1][2])  # stable: the tied copy after everything else
        return dict(entries)

    def describe(self) -> str:
        if self.kind == "BertModel":
            kind = "BERT" + ("" if self.args.get("bert_binary_head", True) else " without binary head")
        else:
            kind = "GPT"
        return f"{kind}, {self.num_layers} layers, untied={self.config.untie_embeddings_and_output_weights}"


def check_parallel_sizes(layout: ModelLayout, tp: int, pp: int, what: str = "target") -> None:
    """Every TP rank must hold whole heads, whole query groups (QKV rows are grouped per key/value head),
    whole FFN units and an equal slice of the vocabulary; every stage an equal number of layers."""
    if tp < 1 or pp < 1:
        raise UserError(f"{what} tensor- and pipeline-parallel sizes must be >= 1, got TP={tp} PP={pp}")
    c = layout.config
    for count, name in ((c.num_attention_heads, "attention heads"), (c.num_query_groups, "query groups"),
                        (c.ffn_hidden_size, "FFN units"), (c.vocab_size, "padded vocabulary entries")):
        if count % tp:
            raise UserError(f"{what} tensor-parallel size {tp} does not divide the model's {count} {name}")
    if layout.num_layers % pp:
        raise UserError(f"{what} pipeline-parallel size {pp} does not divide the model's {layout.num_layers} layers")


def validate_full_model(model: dict, layout: ModelLayout) -> List[str]:
    """Check an unsharded state dict against the model of its args; return its keys in the model's order."""
    if WORD_EMBEDDINGS not in model:
        raise UserError(f"the model has no {WORD_EMBEDDINGS}")
    keys = layout.keys
    missing, extra = [k for k in keys if k not in model], sorted(set(model) - set(keys))
    if missing or extra:
        detail = (f"missing {missing[:3]}" if missing else "") + ("; " if missing and extra else "")
        detail += f"unexpected {extra[:3]}" if extra else ""
        raise UserError(f"the model's parameters do not match its args ({layout.describe()}): {detail}")
    for key in keys:
        want, got = layout.shapes[key], tuple(model[key].shape)
        if want != got:
            raise UserError(f"{key} has shape {list(got)}, but the args ask for {list(want)}")
    return keys


def _shard(full: torch.Tensor, spec: Spec, rank: int, world: int) -> torch.Tensor:
    """A compact copy: `torch.save` of a view would write the whole underlying tensor."""
    part = full if spec is None else shard_tensor(full, spec[0], spec[1], rank, world)
    if spec is None or part.untyped_storage().nbytes() != part.numel() * part.element_size():
        part = part.clone(memory_format=torch.contiguous_format)
    return part


def split_model(full: dict, args: dict, tp: int, pp: int) -> Dict[Rank, dict]:
    """Shard an unsharded state dict for TP x PP: {(tp_rank, stage): local state dict}."""
    layout = ModelLayout.of_model(args, full)
    validate_full_model(full, layout)
    check_parallel_sizes(layout, tp, pp)
    out: Dict[Rank, dict] = {}
    for p in range(pp):
        stage = layout.stage(p, pp)
        for t in range(tp):
            out[(t, p)] = {local: _shard(full[key], spec, t, tp) for local, (key, spec, _) in stage.items()}
    return out


def merge_model(shards: Dict[Rank, dict], args: dict, tp: int, pp: int) -> dict:
    """Inverse of `split_model`: {(tp_rank, stage): local state dict} -> unsharded state dict."""
    layout = ModelLayout.of_shards(args, shards, tp)
    check_parallel_sizes(layout, tp, pp, what="the checkpoint's")
    per_stage = layout.num_layers // pp
    full = {}
    for p in range(pp):
        key_set = set(shards[(0, p)])
        for t in range(1, tp):
            if set(shards[(t, p)]) != key_set:
                diff = sorted(key_set ^ set(shards[(t, p)]))[:3]
                raise UserError(f"TP ranks 0 and {t} of stage {p} hold different parameters: {diff}")
        stage = layout.stage(p, pp)
        for local in shards[(0, p)]:
            if local not in stage:
                m = _LAYER_KEY.match(local)
                if m and int(m["i"]) >= per_stage:
                    raise UserError(f"stage {p} holds {local}, but a stage of a {layout.num_layers}-layer model "
                                    f"with PP={pp} has {per_stage} layers")
                key = f"{m['block']}.layers.{int(m['i']) + p * per_stage}.{m['name']}" if m else local
                layout.spec(key)  # an unknown parameter
                raise UserError(f"stage {p} holds {local}, which is not on stage {p} of {pp} in a model of these "
                                "args")
            key, spec, tied_copy = stage[local]
            if tied_copy:
                continue  # the last stage's copy of the tied word embeddings
            parts = [shards[(t, p)][local] for t in range(tp)]
            if any(x.shape != parts[0].shape or x.dtype != parts[0].dtype for x in parts):
                raise UserError(f"mismatched shapes across TP ranks of stage {p} for {local}: "
                                f"{[f'{list(x.shape)} {x.dtype}' for x in parts]}")
            full[key] = parts[0].clone() if spec is None else merge_shards(parts, *spec)
    keys = validate_full_model(full, layout)
    return {k: full[k] for k in keys}
