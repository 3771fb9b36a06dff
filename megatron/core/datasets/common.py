"""What GPT and BERT data share: --split and --data-path, the config fields both take, and the index cache.

Splits: `--split 949,50,1` gives train, valid and test each a contiguous range of the data's units (GPT
splits sequences, BERT documents); a weight of 0 turns a split off.

The cache: a dataset's index arrays are saved as `<cache>/{md5}-{class}-{split}-{name}.npy` (md5 of a
JSON description of everything they depend on, kept beside them as `...-description.txt`), written
atomically and memory-mapped on later runs. With several ranks, rank 0 builds them first and the others
then map its files (`on_rank_0_first`), for GPT and BERT alike.
"""

import datetime
import hashlib
import json
import math
import os
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron.core.errors import UserError

SPLIT_NAMES = ("train", "valid", "test")
_BUILD_WAIT_HOURS = 24  # how long the other ranks wait for rank 0's index build


# ---------------------------------------------------------------------------------------------------
# Parsing --split and --data-path
# ---------------------------------------------------------------------------------------------------
def parse_split(split: str) -> List[float]:
    """'949,50,1' -> [0.949, 0.05, 0.001]; missing trailing parts are 0."""
    parts = [p for p in re.split(r"[,/]", split.strip()) if p.strip()]
    try:
        weights = [float(p) for p in parts]
    except ValueError:
        weights = []
    if not 1 <= len(weights) <= 3 or any(w < 0 or math.isnan(w) for w in weights) or sum(weights) <= 0:
        raise UserError(
            f"--split {split!r} is not train,valid,test weights; use e.g. --split 949,50,1"
        )
    weights += [0.0] * (3 - len(weights))
    return (np.array(weights, dtype=np.float64) / np.sum(weights)).tolist()


def split_matrix(fractions: List[float]) -> List[Optional[Tuple[float, float]]]:
    """Book-ends of each split, e.g. [0.9, 0.1, 0] -> [(0, 0.9), (0.9, 1.0), None]."""
    ends = [0.0]
    for f in fractions:
        ends.append(ends[-1] + f)
    return [(a, b) if b > a else None for a, b in zip(ends[:-1], ends[1:])]


def split_range(bookends: Tuple[float, float], n: int) -> Tuple[int, int]:
    """The contiguous, unshuffled ids [beg, end) of one split of n units."""
    return int(round(bookends[0] * float(n))), int(round(bookends[1] * float(n)))


def parse_blend(data_path: Sequence[str]) -> Tuple[List[str], Optional[List[float]]]:
    """--data-path in Megatron's forms: `p`, `w1 p1 w2 p2 ...`, or `p1 p2 ...` (weights from sizes)."""
    items = [x.strip() for x in data_path if x.strip()]
    if not items:
        raise UserError("--data-path is empty; give a prefix written by tools/preprocess_data.py")

    def number(x: str) -> Optional[float]:
        try:
            return float(x)
        except ValueError:
            return None

    if len(items) % 2 == 0:
        weights = [number(x) for x in items[0::2]]
        if all(w is not None for w in weights):
            if any(w <= 0 or math.isnan(w) for w in weights):
                raise UserError(f"--data-path weights must be > 0, got {items[0::2]}")
            return items[1::2], weights
        if any(w is not None for w in weights):
            raise UserError(
                f"--data-path {' '.join(items)} mixes weights and prefixes; "
                "use 'w1 prefix1 w2 prefix2 ...' or 'prefix1 prefix2 ...'"
            )
    if any(number(x) is not None for x in items):
        raise UserError(
            f"--data-path {' '.join(items)} has a number without its prefix; "
            "use 'w1 prefix1 w2 prefix2 ...'"
        )
    return items, None


# ---------------------------------------------------------------------------------------------------
# The config fields GPT and BERT share
# ---------------------------------------------------------------------------------------------------
@dataclass
class DatasetConfig:
    """The command-line fields every dataset takes; GPTDatasetConfig and BertDatasetConfig add their own.

    `__post_init__` runs the subclass's `_check()` (its limits on seq_length and seed, with its reasons,
    and its own fields), then parses --data-path (unless `reads_files()` is False) and --split.
    """

    name: ClassVar[str] = ""
    """Names the datasets in messages: "GPT", "BERT"."""

    cache_folder: ClassVar[str] = ""
    """The default cache folder's name under `<dir of first prefix>/cache/`, e.g. "GPTDataset_indices"."""

    no_data_hint: ClassVar[str] = ""
    """Ends the error for a missing --data-path: what data to pass."""

    seq_length: int
    """--seq-length: tokens per sample (the subclass says what a sample holds)."""

    seed: int = 1234
    """--seed: seeds the index builds (the subclass says which draws)."""

    data_path: Optional[List[str]] = None
    """--data-path: `prefix`, `w1 p1 w2 p2 ...` or `p1 p2 ...`; prefixes name `.bin/.idx` pairs."""

    split: str = "969,30,1"
    """--split: train,valid,test weights; each split is a contiguous range of the data's units."""

    data_cache_path: Optional[str] = None
    """--data-cache-path: index cache folder; default `<dir of first prefix>/cache/<cache_folder>`."""

    tokenizer_description: str = ""
    """Names the tokenizer (type and files) in the cache key, so another tokenizer never reuses an index."""

    blend: Tuple[List[str], Optional[List[float]]] = field(init=False, default=None)
    """Parsed data_path: (prefixes, weights or None)."""

    split_matrix: List[Optional[Tuple[float, float]]] = field(init=False, default=None)
    """Parsed split: book-ends per split, None for an empty split."""

    def _check(self) -> None:
        """The subclass's checks, run before --data-path and --split are parsed."""

    def reads_files(self) -> bool:
        """False where the data is made in memory (GPT's --mock-data): no --data-path, nothing cached."""
        return True

    def __post_init__(self) -> None:
        self._check()
        if self.reads_files():
            if not self.data_path:
                raise UserError(f"no training data: pass --data-path PREFIX {self.no_data_hint}")
            self.blend = parse_blend(self.data_path)
        self.split_matrix = split_matrix(parse_split(self.split))

    @property
    def cache_dir(self) -> Optional[str]:
        """Where index arrays are cached; None for data made in memory (rebuilt each time, it is cheap)."""
        if not self.reads_files():
            return None
        if self.data_cache_path:
            return self.data_cache_path
        return os.path.join(os.path.dirname(self.blend[0][0]), "cache", self.cache_folder)


# ---------------------------------------------------------------------------------------------------
# The on-disk index cache (GPTDataset, BertDataset, BlendedDataset) and who builds it
# ---------------------------------------------------------------------------------------------------
def cached_arrays(
    cache_dir: Optional[str],
    base: str,
    description: str,
    names: Sequence[str],
    build: Callable[[], Dict[str, np.ndarray]],
) -> Dict[str, np.ndarray]:
    """Load `names` from `<cache_dir>/<base>-<name>.npy` (memory-mapped), or build and save them.

    Each file is written under a temporary name and renamed, the description last, so a crashed or
    concurrent writer never leaves a file that a reader would take for complete. Ranks that build at
    the same time write identical bytes; the last rename wins.
    """
    if cache_dir is None:
        return build()
    paths = {n: os.path.join(cache_dir, f"{base}-{n}.npy") for n in names}
    desc_path = os.path.join(cache_dir, f"{base}-description.txt")
    if os.path.isfile(desc_path) and all(os.path.isfile(p) for p in paths.values()):
        return {n: np.load(p, mmap_mode="r", allow_pickle=False) for n, p in paths.items()}

    arrays = build()
    try:
        os.makedirs(cache_dir, exist_ok=True)
        for n, p in paths.items():
            tmp = f"{p}.{uuid.uuid4().hex[:12]}.tmp"  # unique per writer, even across hosts
            with open(tmp, "wb") as f:
                np.save(f, arrays[n], allow_pickle=False)
            os.replace(tmp, p)
        tmp = f"{desc_path}.{uuid.uuid4().hex[:12]}.tmp"
        with open(tmp, "w") as f:
            f.write(description)
        os.replace(tmp, desc_path)
    except OSError as e:
        raise UserError(
            f"cannot write the dataset index cache in {cache_dir} ({e.strerror}); "
            "pass --data-cache-path with a writable folder"
        )
    return arrays


def describe(fields: dict) -> Tuple[str, str]:
    """(JSON description, its md5): the cache key."""
    text = json.dumps(fields, indent=4)
    return text, hashlib.md5(text.encode("utf-8")).hexdigest()


def on_rank_0_first(build: Callable[[], Any], what: str) -> Any:
    """`build()` on global rank 0, then, after a collective, on the other ranks; `what` names it in errors.

    Rank 0 builds the indices and writes them to the cache; the others then find the files and
    memory-map them (cached_arrays) instead of each spending the build's time and memory, as Megatron's
    builder does. Where a rank cannot see rank 0's cache folder (a node-local path) it builds its own copy,
    byte-identical. A UserError on rank 0 is raised on every rank, so none waits forever. The wait runs
    in a CPU (gloo) group of its own whose timeout outlasts a long build (the default group's 10 minutes
    would not); if rank 0 dies instead, torchrun stops the others. A single process just builds.
    """
    import torch.distributed as dist  # only here: the dataset modules otherwise import without torch

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return build()
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=_BUILD_WAIT_HOURS))
    result, failure, message = None, None, [None]
    if dist.get_rank() == 0:
        try:
            result = build()
        except Exception as e:  # every rank must reach the collective below
            failure = e
            message[0] = str(e) if isinstance(e, UserError) else (
                f"rank 0 failed building {what} ({type(e).__name__}: {e}); see its traceback")
    dist.broadcast_object_list(message, src=0, group=group)
    dist.destroy_process_group(group)
    if failure is not None:
        raise failure
    if message[0] is not None:
        raise UserError(message[0])
    return result if dist.get_rank() == 0 else build()
