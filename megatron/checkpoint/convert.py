"""Re-lay out a whole checkpoint on disk for other tensor (TP) and pipeline (PP) parallel sizes.

    <load>/iter_0000100/mp_rank_00_000/model_optim_rng.pt   TP=2 PP=2, as training wrote it
                        mp_rank_01_000/ mp_rank_00_001/ mp_rank_01_001/
      -- read_checkpoint -> merge_checkpoint -> (repad_vocab) -> split_checkpoint -> write_checkpoint -->
    <save>/iter_0000100/mp_rank_00/ ... mp_rank_03/           TP=4 PP=1

Training writes one file per (TP rank, PP stage); evaluation and export want one unsharded state dict,
and a resumed run may use another TP/PP. Every layout goes through the same unsharded form (layout.py
merges and splits the model, reading each parameter's split off the model the saved args build), so
any layout converts to any other. The files are written with the trainer's crash-safe protocol.

The padded vocabulary depends on TP (a multiple of `--make-vocab-size-divisible-by` x TP), so a run at
the target TP expects another number of embedding rows than the source holds. When the tokenizer's size
is known (`--true-vocab-size`, or the tokenizer rebuilt from the saved flags) the rows are trimmed or
zero-extended to what that run computes; rows below the tokenizer's size are never touched.

The distributed optimizer's state is kept. With `--use-distributed-optimizer` each rank folder also holds
`distrib_optim.pt`: {"param"|"exp_avg"|"exp_avg_sq": {local parameter name: fp32 tensor}, "step"}, state
dicts with the model's own keys and shapes. Each is merged, re-padded (zero rows, as the weights) and split
exactly like the model, and the `optimizer` entry (grad scaler, param groups) is kept beside it; in memory
a rank's dict carries its distrib_optim.pt under OPTIM_KEY. Resume such a conversion with `--no-load-rng`.
That file does not depend on the data-parallel size, so there is no DP to convert.

A checkpoint written by Megatron-LM (megatron_lm.py) converts too, from any TP x PP: its weights, args and
iteration are kept, its optimizer, scheduler and RNG states dropped; the output is in our format.

Without distrib_optim.pt the optimizer state is dropped: the plain optimizer keeps its moments per rank,
in the order of the rank's local main parameters, with no counterpart in another layout. RNG states are
always dropped (their streams belong to a position in the grid). Resume a converted checkpoint of a plain
optimizer with `--no-load-optim --no-load-rng`, or use `--finetune`.
"""

import os
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from megatron.checkpoint import torch_dist
from megatron.checkpoint.layout import VOCAB_BIASES, VOCAB_KEYS, Rank, merge_model, split_model
from megatron.checkpoint.megatron_lm import IMPORTED, import_checkpoint, other_format_hint
from megatron.checkpoint.naming import DISTRIB_OPTIM, TRACKER, checkpoint_dir, parallel_sizes, parse_rank_dir, rank_file_relpath
from megatron.checkpoint.protocol import committed_dir, read_tracker, torch_load, write_checkpoint_files
from megatron.checkpoint.tokenizer import tokenizer_vocab_size
from megatron.core.errors import UserError
from megatron.core.tokenizer import vocab_size_with_padding

# Top-level keys of a checkpoint that survive conversion; `optimizer` also does when the distributed
# optimizer's state comes with it (OPTIM_KEY), everything else (rng_state, config) is layout-specific.
KEPT_KEYS = ("args", "iteration", "checkpoint_version", "model", "train_state", "consumed_train_samples",
             "consumed_valid_samples", "opt_param_scheduler", "random_ltd")
OPTIM_KEY = "distrib_optim"  # in memory only: a rank's distrib_optim.pt, beside its model_optim_rng.pt keys
# args that must agree between the rank files of one checkpoint
SHAPE_ARGS = ("model_type", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "swiglu",
              "untie_embeddings_and_output_weights", "padded_vocab_size", "tensor_model_parallel_size",
              "pipeline_model_parallel_size", "bert_binary_head")
RESUME_HINT = "continue training from it with --no-load-optim --no-load-rng, or --finetune"
RESUME_HINT_WITH_OPTIM = "continue training from it with --no-load-rng"


@dataclass
class ShardedCheckpoint:
    root: str
    iteration: int
    tp: int
    pp: int
    files: Dict[Rank, dict]  # the loaded model_optim_rng.pt of every rank (and its distrib_optim.pt, OPTIM_KEY)


def _rank_relpath(tp_rank: int, stage: int, pp: int) -> str:
    """PP == 1: mp_rank_{tp:02d}; PP > 1: mp_rank_{tp:02d}_{pp:03d} (Megatron's naming)."""
    return rank_file_relpath(tp_rank, stage if pp > 1 else None)


def _load(path: str) -> dict:
    """mmap when the file allows it (the states we drop are never read into memory); a pickled payload or
    a damaged file is a one-line UserError (protocol.torch_load)."""
    try:
        return torch_load(path, mmap=True)
    except UserError:
        return torch_load(path)  # a file in torch's old non-zip format cannot be mapped


def _load_rank_file(path: str) -> dict:
    """A model_optim_rng.pt; one written by Megatron-LM is read as ours (megatron_lm.py)."""
    return import_checkpoint(_load(path), path)


def read_checkpoint(root: str, iteration: Optional[int] = None, optimizer: bool = False) -> ShardedCheckpoint:
    """Load every rank's file of the latest (or given) iteration; the layout comes from the saved args,
    or from the rank folders when the args do not say. With `optimizer`, each rank's distrib_optim.pt too
    (under OPTIM_KEY), when the checkpoint has them."""
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            raise UserError(f"no checkpoint in {root}: {TRACKER} is missing (pass --iteration N)")
    folder = committed_dir(root, iteration)  # iter_X, or iter_X.old if a save stopped between its renames
    if not os.path.isdir(folder):
        raise UserError(f"checkpoint folder {checkpoint_dir(root, iteration)} is missing")
    names = sorted(os.listdir(folder))
    sizes = parallel_sizes(names)
    if sizes is None:
        raise UserError(f"{folder} holds no mp_rank_* folders{other_format_hint(folder)}")
    tp, pp = sizes
    first = os.path.join(folder, _rank_relpath(0, 0, pp))
    if not os.path.isfile(first):
        raise UserError(f"checkpoint file {first} is missing; the checkpoint at {root} is incomplete")
    files = {(0, 0): _load_rank_file(first)}
    args = files[(0, 0)].get("args") or {}
    tp = int(args.get("tensor_model_parallel_size") or tp)
    pp = int(args.get("pipeline_model_parallel_size") or pp)
    found = {(t, p or 0) for t, p in filter(None, map(parse_rank_dir, names))}
    extra = sorted(r for r in found if r[0] >= tp or r[1] >= pp)
    if extra:
        raise UserError(f"{folder} holds rank folders {extra[:3]} beyond its args' layout TP={tp} PP={pp}")
    for p in range(pp):
        for t in range(tp):
            path = os.path.join(folder, _rank_relpath(t, p, pp))
            if not os.path.isfile(path):
                raise UserError(f"checkpoint file {path} is missing (TP rank {t}, stage {p} of TP={tp} PP={pp})")
            if (t, p) not in files:
                files[(t, p)] = _load_rank_file(path)
    for rank, ckpt in files.items():
        path = os.path.join(folder, _rank_relpath(*rank, pp))
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
            raise UserError(f"{path} holds no model state dict")
        theirs = ckpt.get("args") or {}
        differ = [k for k in SHAPE_ARGS if theirs.get(k) != args.get(k)]
        if differ:
            raise UserError(f"{path} disagrees with rank (0, 0) on {differ[0]}: {theirs.get(differ[0])!r} vs "
                            f"{args.get(differ[0])!r}; the rank files come from different runs")
    if optimizer and IMPORTED not in files[(0, 0)]:  # Megatron-LM's optimizer state is not read
        _read_distrib_optim(folder, files, pp)
    return ShardedCheckpoint(root, iteration, tp, pp, files)


def _read_distrib_optim(folder: str, files: Dict[Rank, dict], pp: int) -> None:
    """Put each rank's distrib_optim.pt under OPTIM_KEY of its dict: all ranks or none must have one, and
    only beside an optimizer entry saved with --use-distributed-optimizer."""
    paths = {r: os.path.join(folder, os.path.dirname(_rank_relpath(*r, pp)), DISTRIB_OPTIM) for r in files}
    have = {r for r, path in paths.items() if os.path.isfile(path)}
    if not have:
        return
    if have != set(files):
        missing = paths[min(set(files) - have)]
        raise UserError(f"{missing} is missing, but other rank folders hold one; the checkpoint is incomplete")
    for rank in sorted(files):
        state = _load(paths[rank])
        if not isinstance(state, dict) or not isinstance(state.get("param"), dict):
            raise UserError(f"{paths[rank]} holds no optimizer state of --use-distributed-optimizer")
        if not (files[rank].get("optimizer") or {}).get("distributed"):
            raise UserError(f"{paths[rank]} sits beside an optimizer state saved without --use-distributed-optimizer; "
                            "the rank folder mixes files of different runs")
        files[rank][OPTIM_KEY] = state


def _with_layout(args: dict, tp: int, pp: int) -> dict:
    return {**args, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}


def _per_param(state: dict) -> Dict[str, dict]:
    """The entries of a distrib_optim.pt that are per-parameter state dicts (param, exp_avg, exp_avg_sq)."""
    return {k: v for k, v in state.items() if isinstance(v, dict)}


def _merge_distrib_optim(sharded: ShardedCheckpoint, args: dict) -> dict:
    """Every rank's distrib_optim.pt -> one for TP=1 PP=1: each per-parameter state dict merged exactly as
    the model; the scalars (`step`) must agree between the ranks."""
    states = {r: f[OPTIM_KEY] for r, f in sharded.files.items()}
    head = states[(0, 0)]
    names = list(_per_param(head))
    out = {k: v for k, v in head.items() if k not in names}  # the scalars
    for rank, state in sorted(states.items()):
        theirs = {k: v for k, v in state.items() if k not in names}
        if set(state) != set(head) or theirs != {k: out[k] for k in theirs}:
            raise UserError(f"the {DISTRIB_OPTIM} of (TP rank, stage) {rank} and (0, 0) differ: {sorted(state)} "
                            f"{theirs} vs {sorted(head)} {out}; the rank files come from different runs")
    for key in names:
        try:
            out[key] = merge_model({r: s[key] for r, s in states.items()}, args, sharded.tp, sharded.pp)
        except UserError as e:
            raise UserError(f"{DISTRIB_OPTIM}, {key!r}: {e}") from None
    return out


def merge_checkpoint(sharded: ShardedCheckpoint) -> dict:
    """The unsharded checkpoint (TP=1 PP=1): merged model, args, iteration and counters, and the merged
    distributed optimizer's state with its `optimizer` entry when the ranks carry one (OPTIM_KEY)."""
    head = sharded.files[(0, 0)]
    args = head.get("args") or {}
    model = merge_model({r: f["model"] for r, f in sharded.files.items()}, args, sharded.tp, sharded.pp)
    out = {k: head[k] for k in KEPT_KEYS if k in head}
    out.update(args=_with_layout(args, 1, 1), model=model)
    out.setdefault("iteration", sharded.iteration)
    if OPTIM_KEY in head:
        out.update(optimizer=head["optimizer"], **{OPTIM_KEY: _merge_distrib_optim(sharded, args)})
    return out


def load_merged_checkpoint(root: str, iteration: Optional[int] = None) -> dict:
    """Any training layout as one unsharded checkpoint dict (see `merge_checkpoint`); `model` loads into
    a TP=1 PP=1 GPTModel (BertModel for a BERT checkpoint)."""
    return merge_checkpoint(read_checkpoint(root, iteration))


def split_checkpoint(ckpt: dict, tp: int, pp: int) -> Dict[Rank, dict]:
    """An unsharded checkpoint dict -> one file's contents per (TP rank, stage) of the target layout (with
    its distrib_optim.pt under OPTIM_KEY when `ckpt` carries the distributed optimizer's state)."""
    args = ckpt.get("args") or {}
    models = split_model(ckpt["model"], args, tp, pp)
    base = {k: ckpt[k] for k in KEPT_KEYS if k in ckpt and k != "model"}
    base["args"] = _with_layout(args, tp, pp)
    files = {rank: {**base, "model": model} for rank, model in models.items()}
    if OPTIM_KEY in ckpt:
        state = ckpt[OPTIM_KEY]
        split = {key: split_model(sd, args, tp, pp) for key, sd in _per_param(state).items()}
        scalars = {k: v for k, v in state.items() if k not in split}
        for rank, payload in files.items():
            payload.update(optimizer=ckpt["optimizer"],
                           **{OPTIM_KEY: {**{key: split[key][rank] for key in split}, **scalars}})
    return files


def write_checkpoint(root: str, iteration: int, files: Dict[Rank, dict], pp: int, report=print) -> None:
    """Write every rank's file, and its distrib_optim.pt beside it when it carries one (OPTIM_KEY), with the
    trainer's crash-safe protocol (`protocol.write_checkpoint_files`: `iter_X.tmp/`, fsynced `.part` files,
    an existing `iter_X` kept as `.old` until the tracker, written last, names the new one). A failure or
    a crash at any point leaves the previous checkpoint loadable."""
    by_path = {}
    for (t, p), payload in sorted(files.items()):
        rel = _rank_relpath(t, p, pp)
        by_path[rel] = {k: v for k, v in payload.items() if k != OPTIM_KEY}
        if OPTIM_KEY in payload:
            by_path[os.path.join(os.path.dirname(rel), DISTRIB_OPTIM)] = payload[OPTIM_KEY]
    write_checkpoint_files(root, iteration, by_path, report)


# ---- vocabulary padding --------------------------------------------------------------------------------
def _repad_rows(state: dict, padded: int, true_vocab: int) -> dict:
    """A state dict whose vocabulary tensors have `padded` rows (see `repad_vocab`)."""
    state = dict(state)
    for key in VOCAB_KEYS + VOCAB_BIASES:
        if key in state:
            rows = state[key]
            if true_vocab > rows.shape[0]:
                raise UserError(f"the tokenizer has {true_vocab} ids but {key} only {rows.shape[0]} rows; "
                                "check --true-vocab-size")
            if padded <= rows.shape[0]:
                state[key] = rows[:padded].clone()
            else:
                state[key] = torch.cat([rows, rows.new_zeros(padded - rows.shape[0], *rows.shape[1:])])
    return state


def repad_vocab(ckpt: dict, padded: int, true_vocab: int) -> dict:
    """An unsharded checkpoint with `padded` vocabulary rows: padding rows (>= `true_vocab`) are dropped or
    added as zeros; the tokenizer's rows are kept bit for bit. The distributed optimizer's per-parameter
    states follow the same rule: a new padding row starts with zero fp32 weights and zero moments."""
    out = {**ckpt, "model": _repad_rows(ckpt["model"], padded, true_vocab),
           "args": {**(ckpt.get("args") or {}), "padded_vocab_size": padded}}
    if OPTIM_KEY in ckpt:
        state = ckpt[OPTIM_KEY]
        out[OPTIM_KEY] = {**state, **{k: _repad_rows(sd, padded, true_vocab) for k, sd in _per_param(state).items()}}
    return out


def _read_any(load: str, iteration: Optional[int]):
    """(merged checkpoint, source (tp, pp) or "torch_dist", iteration, the legacy rank-(0, 0) dict or None)."""
    if iteration is None:
        iteration = read_tracker(load)
        if iteration is None:
            raise UserError(f"no checkpoint in {load}: {TRACKER} is missing (pass --iteration N)")
    folder = committed_dir(load, iteration)
    if torch_dist.is_torch_dist(folder):
        return torch_dist.load_unsharded(folder, optimizer=True), torch_dist.FORMAT, iteration, None
    sharded = read_checkpoint(load, iteration, optimizer=True)
    return merge_checkpoint(sharded), (sharded.tp, sharded.pp), sharded.iteration, sharded


def convert_checkpoint(load: str, save: str, tp: int, pp: int, iteration: Optional[int] = None,
                       true_vocab_size: Optional[int] = None, target_format: str = "torch") -> dict:
    """Read any layout or format from `load`, write TP=`tp` PP=`pp` legacy files to `save` (or, with
    `target_format` "torch_dist", one layout-free checkpoint that any TP/PP resumes); return a summary.

    The padded vocabulary becomes what a TP=`tp` run of the same flags computes when the tokenizer's
    size is known (`true_vocab_size`, else the tokenizer from the saved flags); otherwise it is kept. A
    torch_dist target keeps the rows: its loaders re-pad for their own TP."""
    if os.path.realpath(load) == os.path.realpath(save):
        raise UserError("--save must differ from --load: converting in place would replace the source")
    if true_vocab_size is not None and true_vocab_size < 1:
        raise UserError(f"--true-vocab-size must be >= 1, got {true_vocab_size}")
    merged, source, iteration, sharded = _read_any(load, iteration)
    old_vocab = merged["model"]["embedding.word_embeddings.weight"].shape[0]
    true_vocab = true_vocab_size or tokenizer_vocab_size(merged["args"])
    if true_vocab is not None and target_format == "torch":
        divisible_by = int(merged["args"].get("make_vocab_size_divisible_by") or 128)
        merged = repad_vocab(merged, vocab_size_with_padding(true_vocab, divisible_by, tp), true_vocab)
    if target_format == "torch_dist":
        split_model(merged["model"], merged["args"], 1, 1)  # validates the model against its args
        os.makedirs(save, exist_ok=True)
        torch_dist.save_unsharded(save, iteration, merged, report=lambda message: None)
        files = {}
    else:
        files = split_checkpoint(merged, tp, pp)  # validates the target sizes before anything is written
        os.makedirs(save, exist_ok=True)
        write_checkpoint(save, iteration, files, pp)
    optim = merged.get(OPTIM_KEY)
    kept = set(KEPT_KEYS) | ({"optimizer", OPTIM_KEY} if optim is not None else set())
    head = sharded.files[(0, 0)] if sharded is not None else merged
    imported = head.get(IMPORTED)
    if imported is not None:  # _extra_state entries dropped in all the files
        imported = {**imported, "extra_states": sum(f[IMPORTED]["extra_states"] for f in sharded.files.values())}
    dropped = sorted((set(head) - kept - {IMPORTED}) | set(imported["dropped"] if imported else ()))
    return {"iteration": iteration, "source": source, "target": (tp, pp) if target_format == "torch" else target_format,
            "parameters": sum(v.numel() for v in merged["model"].values()), "files": len(files),
            "dropped": dropped, "vocab": (old_vocab, merged["model"]["embedding.word_embeddings.weight"].shape[0]),
            "true_vocab": true_vocab,
            "distrib_optim": None if optim is None else {"states": list(_per_param(optim)), "step": optim.get("step")},
            "imported": imported,
            "resume_hint": RESUME_HINT if optim is None else RESUME_HINT_WITH_OPTIM}
