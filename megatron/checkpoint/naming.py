"""Names on disk of Megatron's legacy `torch` checkpoint layout: the only place that builds or parses them.

    <root>/latest_checkpointed_iteration.txt           the tracker: "100", the latest complete iteration
    <root>/iter_0000100/                                one iteration (7 digits)
    <root>/iter_0000100.tmp/                            a save in progress, never loaded (protocol.py)
    <root>/iter_0000100.old/                            a complete iteration moved aside by a re-save
    <root>/iter_0000100/mp_rank_01/model_optim_rng.pt   TP rank 1, no pipeline parallelism
    <root>/iter_0000100/mp_rank_01_002/model_optim_rng.pt   TP rank 1, pipeline stage 2

`--ckpt-format torch_dist` (torch_dist.py) keeps the tracker and iteration folders, and fills one folder:
    <root>/iter_0000100/.metadata                       DCP's index of every chunk (rank 0, last)
    <root>/iter_0000100/__3_0.distcp                    the chunks rank 3 wrote
    <root>/iter_0000100/common.json                     args, counters, schedule, scaler (rank 0)
    <root>/iter_0000100/metadata.json                   {"sharded_backend": "torch_dist", ...} (Megatron's)
    <root>/iter_0000100/rng/mp_rank_01_002.json         RNG states of TP rank 1, stage 2 (its DP rank 0)
"""

import os
import re
from typing import Iterable, Optional, Tuple

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_FILE = "model_optim_rng.pt"
DISTRIB_OPTIM = "distrib_optim.pt"  # beside MODEL_FILE: the distributed optimizer's gathered state
COMMON_JSON = "common.json"
FORMAT_JSON = "metadata.json"
RNG_DIR = "rng"
_ITERATION_DIR = re.compile(r"^iter_(\d{7})(?:\.(tmp|old))?$")
_RANK_DIR = re.compile(r"^mp_rank_(\d{2})(?:_(\d{3}))?$")


def iteration_dir_name(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rank_dir_name(tp_rank: int, pp_rank: Optional[int] = None) -> str:
    """`mp_rank_{tp:02d}`, or `mp_rank_{tp:02d}_{pp:03d}` with pipeline parallelism (`pp_rank` not None)."""
    return f"mp_rank_{tp_rank:02d}" if pp_rank is None else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"


def parse_iteration_dir(name: str) -> Optional[Tuple[int, str]]:
    """`iter_0000100` -> (100, ""); `iter_0000100.tmp` -> (100, "tmp"); `.old` -> (100, "old"); else None."""
    m = _ITERATION_DIR.match(name)
    return None if m is None else (int(m.group(1)), m.group(2) or "")


def parse_rank_dir(name: str) -> Optional[Tuple[int, Optional[int]]]:
    """`mp_rank_01` -> (1, None); `mp_rank_01_002` -> (1, 2); any other name -> None."""
    m = _RANK_DIR.match(name)
    return None if m is None else (int(m.group(1)), None if m.group(2) is None else int(m.group(2)))


def parallel_sizes(names: Iterable[str]) -> Optional[Tuple[int, int]]:
    """(TP, PP) sizes read off the rank folders among `names` (1 + the largest ranks); None if none is one."""
    ranks = [r for r in map(parse_rank_dir, names) if r is not None]
    if not ranks:
        return None
    return 1 + max(t for t, _ in ranks), 1 + max(p or 0 for _, p in ranks)


def rank_file_relpath(tp_rank: int, pp_rank: Optional[int] = None) -> str:
    """`mp_rank_XX[_YYY]/model_optim_rng.pt`, relative to an iteration folder."""
    return os.path.join(rank_dir_name(tp_rank, pp_rank), MODEL_FILE)


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, iteration_dir_name(iteration))


def checkpoint_file(root: str, iteration: int, tp_rank: int = 0, pp_rank: Optional[int] = None) -> str:
    return os.path.join(checkpoint_dir(root, iteration), rank_file_relpath(tp_rank, pp_rank))


def rng_file_relpath(tp_rank: int, pp_rank: int) -> str:
    """`rng/mp_rank_{tp:02d}_{pp:03d}.json`, relative to a torch_dist iteration folder."""
    return os.path.join(RNG_DIR, rank_dir_name(tp_rank, pp_rank) + ".json")
