"""Re-lay out a checkpoint for other tensor (TP) and pipeline (PP) parallel sizes.

Training writes one file per (TP rank, PP stage); evaluation and export want one unsharded state dict,
and a resumed run may use another TP/PP. This module merges the shards into the layout-free model
(global layer numbers, whole tensors) and splits it again, so every layout goes through the same
unsharded form and any layout converts to any other.

How each parameter is split is a property of its name (the tables below), checked against the model's
shape from the saved `args`: an unknown name is refused rather than guessed, because taking rank 0's
copy of a tensor that is really sharded would silently produce a wrong model. Replicated tensors are
taken from TP rank 0 (training keeps the copies equal). With tied embeddings and PP > 1 the last stage's
`output_layer.weight` is a copy of the word embeddings: dropped on merge, re-made on split.

GPT and BERT (`model_type: bert` in the saved args) share the layer names; BERT's block is `encoder`
instead of `decoder`, and it adds the token-type embeddings (first stage) and, on the last stage, the MLM
head (`lm_head.*`, replicated), the vocab-parallel `output_layer.bias`, and with the binary (SOP) head the
replicated `pooler.*` and `binary_head.*` (megatron/core/models/bert.py).

The padded vocabulary depends on TP (a multiple of `--make-vocab-size-divisible-by` x TP), so a run at
the target TP expects another number of embedding rows than the source holds. When the tokenizer's size
is known (`--true-vocab-size`, or the tokenizer rebuilt from the saved flags) the rows are trimmed or
zero-extended to what that run computes; rows below the tokenizer's size are never touched.

Optimizer and RNG states are dropped: both are per rank (the optimizer's moments are keyed by the rank's
local parameters, the RNG streams by its position in the grid) and have no counterpart in another
layout. Resume a converted checkpoint with `--no-load-optim --no-load-rng`, or use `--finetune`.
"""

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from megatron.core.errors import UserError
from megatron.core.tensor_parallel.sharding import merge_shards, shard_tensor  # stride-aware, shared with the model
from megatron.core.tokenizer import TokenizerConfig, build_tokenizer, vocab_size_with_padding
from megatron.training.checkpointing import (
    TRACKER, checkpoint_dir, checkpoint_file, committed_dir, read_tracker, torch_load, write_checkpoint_files,
)

Rank = Tuple[int, int]  # (tensor-parallel rank, pipeline stage)

# Top-level keys of a checkpoint that survive conversion; everything else (optimizer, rng_state) is
# layout-specific and dropped.
KEPT_KEYS = ("args", "iteration", "checkpoint_version", "model", "train_state", "consumed_train_samples",
             "consumed_valid_samples", "opt_param_scheduler", "random_ltd")
# args that must agree between the rank files of one checkpoint
SHAPE_ARGS = ("model_type", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "swiglu",
              "untie_embeddings_and_output_weights", "padded_vocab_size", "tensor_model_parallel_size",
              "pipeline_model_parallel_size", "bert_binary_head")
RESUME_HINT = "continue training from it with --no-load-optim --no-load-rng, or --finetune"

REPLICATED = None
FC1 = "fc1"  # dim 0, stride 2 ([gate; up]) with SwiGLU, else stride 1
# name (per-layer names without the `decoder.layers.{i}.` / `encoder.layers.{i}.` prefix) -> partition dim
# (None = replicated)
TOP_LEVEL = {
    "embedding.word_embeddings.weight": 0,
    "embedding.position_embeddings.weight": REPLICATED,
    "decoder.final_layernorm.weight": REPLICATED,
    "decoder.final_layernorm.bias": REPLICATED,
    "output_layer.weight": 0,
    # BERT
    "embedding.tokentype_embeddings.weight": REPLICATED,
    "encoder.final_layernorm.weight": REPLICATED,
    "encoder.final_layernorm.bias": REPLICATED,
    "lm_head.dense.weight": REPLICATED,
    "lm_head.dense.bias": REPLICATED,
    "lm_head.layer_norm.weight": REPLICATED,
    "lm_head.layer_norm.bias": REPLICATED,
    "output_layer.bias": 0,  # the MLM logits' bias, split with the vocabulary
    "pooler.dense.weight": REPLICATED,
    "pooler.dense.bias": REPLICATED,
    "binary_head.weight": REPLICATED,
    "binary_head.bias": REPLICATED,
}
LAST_STAGE_PREFIXES = ("decoder.final_layernorm.", "encoder.final_layernorm.", "output_layer.", "lm_head.",
                       "pooler.", "binary_head.")
PER_LAYER = {
    "input_layernorm.weight": REPLICATED,
    "input_layernorm.bias": REPLICATED,
    "self_attention.linear_qkv.weight": 0,
    "self_attention.linear_qkv.bias": 0,
    "self_attention.linear_proj.weight": 1,
    "self_attention.linear_proj.bias": REPLICATED,
    "pre_mlp_layernorm.weight": REPLICATED,
    "pre_mlp_layernorm.bias": REPLICATED,
    "mlp.linear_fc1.weight": FC1,
    "mlp.linear_fc1.bias": FC1,
    "mlp.linear_fc2.weight": 1,
    "mlp.linear_fc2.bias": REPLICATED,
}
_LAYER_KEY = re.compile(r"^(?P<block>decoder|encoder)\.layers\.(?P<i>\d+)\.(?P<name>.+)$")


# ---- model shape and names ----------------------------------------------------------------------------
@dataclass
class ModelShape:
    """The sizes that decide shard shapes, read from a checkpoint's `args`."""
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    ffn_hidden_size: int
    swiglu: bool
    untied: bool
    padded_vocab_size: Optional[int] = None  # None: taken from the word embeddings
    max_position_embeddings: Optional[int] = None
    bert: bool = False  # BERT: `encoder` block, token types, MLM head, output bias
    binary_head: bool = False  # BERT with the pooler and the SOP head (and token types)

    @property
    def block(self) -> str:
        return "encoder" if self.bert else "decoder"

    @classmethod
    def from_args(cls, args: dict) -> "ModelShape":
        missing = [k for k in ("num_layers", "hidden_size", "num_attention_heads") if args.get(k) is None]
        if missing:
            raise UserError(f"the checkpoint's args lack {', '.join(missing)}; it was not written by this project")
        h, swiglu = int(args["hidden_size"]), bool(args.get("swiglu", False))
        ffn = args.get("ffn_hidden_size")
        if ffn is None:  # Megatron's default, as in TransformerConfig
            ffn = int(4 * h * 2 / 3 / 64) * 64 if swiglu else 4 * h
        vocab, max_pos = args.get("padded_vocab_size"), args.get("max_position_embeddings")
        bert = args.get("model_type") == "bert"
        return cls(int(args["num_layers"]), h, int(args["num_attention_heads"]), int(ffn), swiglu,
                   bool(args.get("untie_embeddings_and_output_weights", False)),
                   None if vocab is None else int(vocab), None if max_pos is None else int(max_pos),
                   bert, bert and bool(args.get("bert_binary_head", True)))

    def full_shape(self, name: str) -> Tuple[Optional[int], ...]:
        """Unsharded shape of a top-level or per-layer name; None matches any size."""
        h, f, V = self.hidden_size, self.ffn_hidden_size, self.padded_vocab_size
        f1 = 2 * f if self.swiglu else f
        return {
            "embedding.word_embeddings.weight": (V, h), "output_layer.weight": (V, h),
            "embedding.position_embeddings.weight": (self.max_position_embeddings, h),
            "self_attention.linear_qkv.weight": (3 * h, h), "self_attention.linear_qkv.bias": (3 * h,),
            "self_attention.linear_proj.weight": (h, h),
            "mlp.linear_fc1.weight": (f1, h), "mlp.linear_fc1.bias": (f1,),
            "mlp.linear_fc2.weight": (h, f),
            "embedding.tokentype_embeddings.weight": (2, h), "output_layer.bias": (V,),
            "lm_head.dense.weight": (h, h), "pooler.dense.weight": (h, h),
            "binary_head.weight": (2, h), "binary_head.bias": (2,),
        }.get(name, (h,))  # norms, the row-parallel biases, the heads' h-sized biases


def partition_spec(key: str, swiglu: bool) -> Optional[Tuple[int, int]]:
    """(partition dim, stride) of a state-dict key, or None when every TP rank holds the whole tensor."""
    m = _LAYER_KEY.match(key)
    table, name = (PER_LAYER, m["name"]) if m else (TOP_LEVEL, key)
    if name not in table:
        raise UserError(f"unknown parameter {key!r} in the checkpoint; checkpoint_layout.py does not know how it "
                        "is split across tensor-parallel ranks")
    dim = table[name]
    if dim == FC1:
        return 0, 2 if swiglu else 1
    return None if dim is None else (dim, 1)


def check_parallel_sizes(shape: ModelShape, tp: int, pp: int, what: str = "target") -> None:
    """Every TP rank must hold whole heads, whole FFN units and an equal slice of the vocabulary; every
    stage an equal number of layers."""
    if tp < 1 or pp < 1:
        raise UserError(f"{what} tensor- and pipeline-parallel sizes must be >= 1, got TP={tp} PP={pp}")
    for count, name in ((shape.num_attention_heads, "attention heads"), (shape.ffn_hidden_size, "FFN units"),
                        (shape.padded_vocab_size, "padded vocabulary entries")):
        if count is not None and count % tp:
            raise UserError(f"{what} tensor-parallel size {tp} does not divide the model's {count} {name}")
    if shape.num_layers % pp:
        raise UserError(f"{what} pipeline-parallel size {pp} does not divide the model's {shape.num_layers} layers")


def expected_keys(shape: ModelShape, positions: bool, linear_bias: bool, norm_bias: bool) -> List[str]:
    """The unsharded model's keys, in the order the model registers them (GPTModel, BertModel)."""
    def norm(prefix):
        return [f"{prefix}.weight"] + ([f"{prefix}.bias"] if norm_bias else [])

    def linear(prefix):
        return [f"{prefix}.weight"] + ([f"{prefix}.bias"] if linear_bias else [])

    keys = ["embedding.word_embeddings.weight"] + (["embedding.position_embeddings.weight"] if positions else [])
    keys += ["embedding.tokentype_embeddings.weight"] if shape.binary_head else []
    for i in range(shape.num_layers):
        p = f"{shape.block}.layers.{i}."
        keys += norm(p + "input_layernorm") + linear(p + "self_attention.linear_qkv")
        keys += linear(p + "self_attention.linear_proj") + norm(p + "pre_mlp_layernorm")
        keys += linear(p + "mlp.linear_fc1") + linear(p + "mlp.linear_fc2")
    keys += norm(f"{shape.block}.final_layernorm")
    if shape.bert:  # the MLM head's transform is an nn.Linear (always a bias) and a norm
        keys += ["lm_head.dense.weight", "lm_head.dense.bias"] + norm("lm_head.layer_norm")
    keys += ["output_layer.weight"] if shape.untied else []
    keys += ["output_layer.bias"] if shape.bert else []
    if shape.binary_head:
        keys += ["pooler.dense.weight", "pooler.dense.bias", "binary_head.weight", "binary_head.bias"]
    return keys


def _name(key: str) -> str:
    m = _LAYER_KEY.match(key)
    return m["name"] if m else key


def validate_full_model(model: dict, shape: ModelShape) -> List[str]:
    """Check an unsharded state dict against the shape; return its keys in canonical order."""
    if "embedding.word_embeddings.weight" not in model:
        raise UserError("the model has no embedding.word_embeddings.weight")
    if shape.padded_vocab_size is None:
        shape.padded_vocab_size = model["embedding.word_embeddings.weight"].shape[0]
    keys = expected_keys(shape, "embedding.position_embeddings.weight" in model,
                         f"{shape.block}.layers.0.self_attention.linear_qkv.bias" in model,
                         f"{shape.block}.final_layernorm.bias" in model)
    missing, extra = [k for k in keys if k not in model], sorted(set(model) - set(keys))
    if missing or extra:
        detail = (f"missing {missing[:3]}" if missing else "") + ("; " if missing and extra else "")
        detail += f"unexpected {extra[:3]}" if extra else ""
        kind = ("BERT" + ("" if shape.binary_head else " without binary head")) if shape.bert else "GPT"
        raise UserError(f"the model's parameters do not match its args ({kind}, {shape.num_layers} layers, untied="
                        f"{shape.untied}): {detail}")
    for key in keys:
        want, got = shape.full_shape(_name(key)), tuple(model[key].shape)
        if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
            raise UserError(f"{key} has shape {list(got)}, but the args ask for {list(want)}")
    return keys


# ---- split and merge ----------------------------------------------------------------------------------
def _stage_key(key: str, stage: int, layers_per_stage: int) -> Optional[str]:
    """The key's name in stage `stage` (local layer number), or None when the stage does not hold it."""
    m = _LAYER_KEY.match(key)
    if m:
        i = int(m["i"])
        if i // layers_per_stage != stage:
            return None
        return f"{m['block']}.layers.{i - stage * layers_per_stage}.{m['name']}"
    return key


def split_model(full: dict, shape: ModelShape, tp: int, pp: int) -> Dict[Rank, dict]:
    """Shard an unsharded state dict for TP x PP: {(tp_rank, stage): local state dict}."""
    keys = validate_full_model(full, shape)
    check_parallel_sizes(shape, tp, pp)
    per_stage = shape.num_layers // pp
    out: Dict[Rank, dict] = {}
    for p in range(pp):
        first, last = p == 0, p == pp - 1
        for t in range(tp):
            sd = {}
            for key in keys:
                if (key.startswith("embedding.") and not first) or (key.startswith(LAST_STAGE_PREFIXES) and not last):
                    continue
                local = _stage_key(key, p, per_stage)
                if local is not None:
                    sd[local] = _shard(full[key], partition_spec(key, shape.swiglu), t, tp)
            if last and not first and not shape.untied:  # the last stage's copy of the tied embeddings
                sd["output_layer.weight"] = _shard(full["embedding.word_embeddings.weight"], (0, 1), t, tp)
            out[(t, p)] = sd
    return out


def _shard(full: torch.Tensor, spec, rank: int, world: int) -> torch.Tensor:
    """A compact copy: `torch.save` of a view would write the whole underlying tensor."""
    part = full if spec is None else shard_tensor(full, spec[0], spec[1], rank, world)
    if spec is None or part.untyped_storage().nbytes() != part.numel() * part.element_size():
        part = part.clone(memory_format=torch.contiguous_format)
    return part


def merge_model(shards: Dict[Rank, dict], shape: ModelShape, tp: int, pp: int) -> dict:
    """Inverse of `split_model`: {(tp_rank, stage): local state dict} -> unsharded state dict."""
    check_parallel_sizes(shape, tp, pp, what="the checkpoint's")
    per_stage = shape.num_layers // pp
    full = {}
    for p in range(pp):
        key_set = set(shards[(0, p)])
        for t in range(1, tp):
            if set(shards[(t, p)]) != key_set:
                diff = sorted(key_set ^ set(shards[(t, p)]))[:3]
                raise UserError(f"TP ranks 0 and {t} of stage {p} hold different parameters: {diff}")
        for local in shards[(0, p)]:
            if local == "output_layer.weight" and not shape.untied and pp > 1:
                continue  # the last stage's copy of the tied word embeddings
            m = _LAYER_KEY.match(local)
            key = local
            if m:
                i = int(m["i"])
                if i >= per_stage:
                    raise UserError(f"stage {p} holds {local}, but a stage of a {shape.num_layers}-layer model "
                                    f"with PP={pp} has {per_stage} layers")
                key = f"{m['block']}.layers.{i + p * per_stage}.{m['name']}"
            if key in full:
                raise UserError(f"{key} is held by more than one pipeline stage")
            parts = [shards[(t, p)][local] for t in range(tp)]
            if any(x.shape != parts[0].shape or x.dtype != parts[0].dtype for x in parts):
                raise UserError(f"mismatched shapes across TP ranks of stage {p} for {local}: "
                                f"{[f'{list(x.shape)} {x.dtype}' for x in parts]}")
            spec = partition_spec(key, shape.swiglu)
            full[key] = parts[0].clone() if spec is None else merge_shards(parts, *spec)
    keys = validate_full_model(full, shape)
    return {k: full[k] for k in keys}


# ---- checkpoints on disk ------------------------------------------------------------------------------
@dataclass
class ShardedCheckpoint:
    root: str
    iteration: int
    tp: int
    pp: int
    files: Dict[Rank, dict]  # the loaded model_optim_rng.pt of every rank


def rank_file(root: str, iteration: int, tp_rank: int, stage: int, pp: int) -> str:
    """PP == 1: mp_rank_{tp:02d}; PP > 1: mp_rank_{tp:02d}_{pp:03d} (Megatron's naming)."""
    return checkpoint_file(root, iteration, tp_rank, stage if pp > 1 else None)


def _rank_relpath(tp_rank: int, stage: int, pp: int) -> str:
    """`mp_rank_XX[_YYY]/model_optim_rng.pt`, relative to an iteration folder."""
    return os.path.relpath(rank_file("", 0, tp_rank, stage, pp), checkpoint_dir("", 0))


def _load(path: str) -> dict:
    """mmap when the file allows it (the optimizer states we drop are never read into memory); a pickled
    payload or a damaged file is a one-line UserError (checkpointing.torch_load)."""
    try:
        return torch_load(path, mmap=True)
    except UserError:
        return torch_load(path)  # a file in torch's old non-zip format cannot be mapped


def read_checkpoint(root: str, iteration: Optional[int] = None) -> ShardedCheckpoint:
    """Load every rank's file of the latest (or given) iteration; the layout comes from the saved args,
    or from the rank folders when the args do not say."""
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            raise UserError(f"no checkpoint in {root}: {TRACKER} is missing (pass --iteration N)")
    folder = committed_dir(root, iteration)  # iter_X, or iter_X.old if a save stopped between its renames
    if not os.path.isdir(folder):
        raise UserError(f"checkpoint folder {checkpoint_dir(root, iteration)} is missing")
    names = [re.fullmatch(r"mp_rank_(\d{2})(?:_(\d{3}))?", n) for n in sorted(os.listdir(folder))]
    names = [m for m in names if m]
    if not names:
        raise UserError(f"{folder} holds no mp_rank_* folders")
    tp = max(int(m.group(1)) for m in names) + 1
    pp = max(int(m.group(2) or 0) for m in names) + 1
    first = os.path.join(folder, _rank_relpath(0, 0, pp))
    if not os.path.isfile(first):
        raise UserError(f"checkpoint file {first} is missing; the checkpoint at {root} is incomplete")
    files = {(0, 0): _load(first)}
    args = files[(0, 0)].get("args") or {}
    tp = int(args.get("tensor_model_parallel_size") or tp)
    pp = int(args.get("pipeline_model_parallel_size") or pp)
    found = {(int(m.group(1)), int(m.group(2) or 0)) for m in names}
    extra = sorted(r for r in found if r[0] >= tp or r[1] >= pp)
    if extra:
        raise UserError(f"{folder} holds rank folders {extra[:3]} beyond its args' layout TP={tp} PP={pp}")
    for p in range(pp):
        for t in range(tp):
            path = os.path.join(folder, _rank_relpath(t, p, pp))
            if not os.path.isfile(path):
                raise UserError(f"checkpoint file {path} is missing (TP rank {t}, stage {p} of TP={tp} PP={pp})")
            if (t, p) not in files:
                files[(t, p)] = _load(path)
    for rank, ckpt in files.items():
        path = os.path.join(folder, _rank_relpath(*rank, pp))
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise UserError(f"{path} holds no model state dict")
        theirs = ckpt.get("args") or {}
        differ = [k for k in SHAPE_ARGS if theirs.get(k) != args.get(k)]
        if differ:
            raise UserError(f"{path} disagrees with rank (0, 0) on {differ[0]}: {theirs.get(differ[0])!r} vs "
                            f"{args.get(differ[0])!r}; the rank files come from different runs")
    return ShardedCheckpoint(root, iteration, tp, pp, files)


def _with_layout(args: dict, tp: int, pp: int) -> dict:
    return {**args, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}


def merge_checkpoint(sharded: ShardedCheckpoint) -> dict:
    """The unsharded checkpoint (TP=1 PP=1): merged model, args, iteration and counters."""
    head = sharded.files[(0, 0)]
    args = head.get("args") or {}
    shape = ModelShape.from_args(args)
    model = merge_model({r: f["model"] for r, f in sharded.files.items()}, shape, sharded.tp, sharded.pp)
    out = {k: head[k] for k in KEPT_KEYS if k in head}
    out.update(args=_with_layout(args, 1, 1), model=model)
    out.setdefault("iteration", sharded.iteration)
    return out


def load_merged_checkpoint(root: str, iteration: Optional[int] = None) -> dict:
    """For evaluation and export: any training layout as one unsharded checkpoint dict (see
    `merge_checkpoint`); `model` loads into a TP=1 PP=1 GPTModel (BertModel for a BERT checkpoint)."""
    return merge_checkpoint(read_checkpoint(root, iteration))


def split_checkpoint(ckpt: dict, tp: int, pp: int) -> Dict[Rank, dict]:
    """An unsharded checkpoint dict -> one file's contents per (TP rank, stage) of the target layout."""
    shape = ModelShape.from_args(ckpt.get("args") or {})
    models = split_model(ckpt["model"], shape, tp, pp)
    base = {k: ckpt[k] for k in KEPT_KEYS if k in ckpt and k != "model"}
    base["args"] = _with_layout(ckpt.get("args") or {}, tp, pp)
    return {rank: {**base, "model": model} for rank, model in models.items()}


def write_checkpoint(root: str, iteration: int, files: Dict[Rank, dict], pp: int, report=print) -> None:
    """Write every rank's file with the trainer's crash-safe protocol (`checkpointing.write_checkpoint_files`:
    `iter_X.tmp/`, fsynced `.part` files, an existing `iter_X` kept as `.old` until the tracker, written
    last, names the new one). A failure or a crash at any point leaves the previous checkpoint loadable."""
    by_path = {_rank_relpath(t, p, pp): payload for (t, p), payload in sorted(files.items())}
    write_checkpoint_files(root, iteration, by_path, report)


# ---- vocabulary padding --------------------------------------------------------------------------------
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")  # [V, h]
VOCAB_BIASES = ("output_layer.bias",)  # [V], BERT's MLM logits


def tokenizer_vocab_size(args: dict) -> Optional[int]:
    """The training tokenizer's size before padding: saved by the trainer as `true_vocab_size`, or rebuilt
    from the saved tokenizer flags when they still find their files (older checkpoints)."""
    if args.get("true_vocab_size"):
        return int(args["true_vocab_size"])
    if args.get("tokenizer_type") is None:
        return None
    flags = {k: args.get(k) for k in ("tokenizer_type", "vocab_file", "merge_file", "tokenizer_model", "vocab_size")}
    try:
        return build_tokenizer(TokenizerConfig(**flags)).vocab_size
    except Exception:  # noqa: BLE001 - moved files, a missing library: the caller falls back to --true-vocab-size
        return None


def repad_vocab(ckpt: dict, padded: int, true_vocab: int) -> dict:
    """An unsharded checkpoint with `padded` vocabulary rows: padding rows (>= `true_vocab`) are dropped or
    added as zeros; the tokenizer's rows are kept bit for bit."""
    model = dict(ckpt["model"])
    for key in VOCAB_KEYS + VOCAB_BIASES:
        if key in model:
            rows = model[key]
            if true_vocab > rows.shape[0]:
                raise UserError(f"the tokenizer has {true_vocab} ids but {key} only {rows.shape[0]} rows; "
                                "check --true-vocab-size")
            if padded <= rows.shape[0]:
                model[key] = rows[:padded].clone()
            else:
                model[key] = torch.cat([rows, rows.new_zeros(padded - rows.shape[0], *rows.shape[1:])])
    return {**ckpt, "model": model, "args": {**(ckpt.get("args") or {}), "padded_vocab_size": padded}}


def convert_checkpoint(load: str, save: str, tp: int, pp: int, iteration: Optional[int] = None,
                       true_vocab_size: Optional[int] = None) -> dict:
    """Read any layout from `load`, write TP=`tp` PP=`pp` to `save`; return a summary dict.

    The padded vocabulary becomes what a TP=`tp` run of the same flags computes when the tokenizer's
    size is known (`true_vocab_size`, else the tokenizer from the saved flags); otherwise it is kept."""
    if os.path.realpath(load) == os.path.realpath(save):
        raise UserError("--save must differ from --load: converting in place would replace the source")
    if true_vocab_size is not None and true_vocab_size < 1:
        raise UserError(f"--true-vocab-size must be >= 1, got {true_vocab_size}")
    sharded = read_checkpoint(load, iteration)
    merged = merge_checkpoint(sharded)
    old_vocab = merged["model"]["embedding.word_embeddings.weight"].shape[0]
    true_vocab = true_vocab_size or tokenizer_vocab_size(merged["args"])
    if true_vocab is not None:
        divisible_by = int(merged["args"].get("make_vocab_size_divisible_by") or 128)
        merged = repad_vocab(merged, vocab_size_with_padding(true_vocab, divisible_by, tp), true_vocab)
    files = split_checkpoint(merged, tp, pp)  # validates the target sizes before anything is written
    os.makedirs(save, exist_ok=True)
    write_checkpoint(save, sharded.iteration, files, pp)
    dropped = sorted(set(sharded.files[(0, 0)]) - set(KEPT_KEYS))
    return {"iteration": sharded.iteration, "source": (sharded.tp, sharded.pp), "target": (tp, pp),
            "parameters": sum(v.numel() for v in merged["model"].values()), "files": len(files),
            "dropped": dropped, "vocab": (old_vocab, merged["model"]["embedding.word_embeddings.weight"].shape[0]),
            "true_vocab": true_vocab}
