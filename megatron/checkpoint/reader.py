"""A checkpoint's unsharded model and saved args, whatever layout wrote it: for evaluation, export and
fine-tuning, in one process.

    ckpt = load_unsharded_checkpoint("runs/gpt/checkpoints")   # the tracker's iteration
    ckpt = load_unsharded_checkpoint("runs/gpt/checkpoints/iter_0000100")
    ckpt.model   # the TP=1 PP=1 state dict: global layer numbers, whole tensors
    ckpt.args    # the flags saved by the trainer

`--load` names the checkpoint root (holding latest_checkpointed_iteration.txt) or one `iter_XXXXXXX`
folder in it. A torch_dist checkpoint is read whole by DCP in this one process (torch_dist.py). A
single-file checkpoint (`iter_X/mp_rank_00/`) is loaded as it is; a tensor- or pipeline-parallel one
(`mp_rank_01/`, `mp_rank_00_001/`, ...) is merged in memory by convert.py, the logic behind
`tools/checkpoint_util.py --merge`.
"""

import os
from typing import NamedTuple, Optional, Tuple

from megatron.checkpoint import torch_dist
from megatron.checkpoint.convert import load_merged_checkpoint
from megatron.checkpoint.naming import TRACKER, checkpoint_dir, parse_iteration_dir, parse_rank_dir, rank_dir_name
from megatron.checkpoint.protocol import committed_dir, load_checkpoint, read_tracker
from megatron.core.errors import UserError


class UnshardedCheckpoint(NamedTuple):
    root: str  # the checkpoint folder (holding latest_checkpointed_iteration.txt)
    iteration: int
    args: dict  # the training flags saved in the checkpoint
    model: dict  # the single-process model's state dict


def resolve_checkpoint(load: str, iteration: Optional[int] = None) -> Tuple[str, int]:
    """(root, iteration) for `--load`, which may name the checkpoint root or one `iter_XXXXXXX` folder."""
    load = os.path.abspath(os.path.expanduser(load))
    if not os.path.isdir(load):
        raise UserError(f"--load {load}: no such folder; pass a checkpoint folder written with --save")
    parsed = parse_iteration_dir(os.path.basename(load))
    if parsed is not None and not parsed[1] and iteration is None:
        return os.path.dirname(load), parsed[0]
    if iteration is None:
        iteration = read_tracker(load)
    if iteration is None:
        raise UserError(f"--load {load} holds no checkpoint (no {TRACKER}); "
                        f"pass the folder given to --save, or one iter_XXXXXXX folder in it")
    return load, iteration


def is_single_file_layout(root: str, iteration: int) -> bool:
    """True for `iter_XXXXXXX/mp_rank_00/`; False for a tensor/pipeline-parallel checkpoint."""
    folder = checkpoint_dir(root, iteration)
    if not os.path.isdir(folder):
        raise UserError(f"checkpoint folder {folder} is missing; --load {root} has no iteration {iteration}")
    ranks = sorted(d for d in os.listdir(folder) if parse_rank_dir(d) is not None)
    return not ranks or ranks == [rank_dir_name(0)]


def load_unsharded_checkpoint(load: str, iteration: Optional[int] = None) -> UnshardedCheckpoint:
    """The model state dict (TP=1 PP=1) and saved args of the checkpoint at `load`, any layout."""
    root, iteration = resolve_checkpoint(load, iteration)
    folder = committed_dir(root, iteration)
    if torch_dist.is_torch_dist(folder):
        ckpt = torch_dist.load_unsharded(folder)
    elif is_single_file_layout(root, iteration):
        ckpt = load_checkpoint(root, iteration)
    else:
        ckpt = load_merged_checkpoint(root, iteration)
    if not isinstance(ckpt.get("model"), dict):
        raise UserError(f"checkpoint {root} iteration {iteration} holds no model state dict")
    return UnshardedCheckpoint(root, iteration, dict(ckpt.get("args") or {}), dict(ckpt["model"]))
