"""Checkpoints in Megatron's legacy `torch` layout: crash-safe to write, safe to load.

    <save>/latest_checkpointed_iteration.txt          "100"
    <save>/iter_0000100/mp_rank_00/model_optim_rng.pt

With pipeline parallelism the rank folders are `mp_rank_{tp:02d}_{pp:03d}` (every name: naming.py).
Files hold only tensors and plain Python values (args as a dict, RNG states as tensors), and every load
uses `torch.load(weights_only=True)`, so a checkpoint carrying a pickled payload is refused unrun. A file
written by Megatron-LM (args an argparse.Namespace) is read as ours by megatron_lm.py.

Saving iteration X (a kill -9 or a node crash at any moment leaves the tracker and the checkpoint it
names loadable; tests/reliability/test_crash_safe_saves.py kills saves at random and at every step):

 1. rank 0 clears leftovers of interrupted saves: `iter_*.tmp` (never complete) are removed and
    reported; `iter_Y.old` (a complete Y moved aside by step 4) is put back if `iter_Y` is missing.
 2. each writer writes `iter_X.tmp/<rank>/model_optim_rng.pt` through a `.part` file, fsynced.
 3. all ranks agree that every write succeeded (one all-reduce): a full disk on one rank fails the save
    on every rank with one message instead of leaving the others waiting in a barrier.
 4. rank 0: an existing `iter_X` (re-saving an iteration) is renamed to `iter_X.old`, then
    `iter_X.tmp` is renamed to `iter_X`.
 5. the tracker is written to a temporary file, fsynced and renamed over the old one: the commit.
 6. `iter_X.old` is removed.
 A failure of steps 4-5 on rank 0 (a full disk under the tracker's temporary file) is agreed the same
 way as step 3: rank 0 undoes its renames (`iter_X` back to `iter_X.tmp`, `iter_X.old` back to
 `iter_X`) and every rank raises the same kind of one-line error, instead of waiting in a barrier.

Readers look only at the tracker and complete `iter_X` folders, or at `iter_X.old` when `iter_X` is
missing (the instant between the two renames of step 4). A half-written folder is never loaded.
"""

import json
import os
import re
import shutil
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.checkpoint import megatron_lm
from megatron.checkpoint.naming import (
    TRACKER, checkpoint_dir, parallel_sizes, parse_iteration_dir, rank_file_relpath,
)
from megatron.core.errors import UserError

CHECKPOINT_VERSION = 3.0


class CheckpointWriteError(UserError, OSError):
    """A save failed (disk full, permissions): one line for the user, and still an OSError for callers."""


def committed_dir(root: str, iteration: int) -> str:
    """The folder holding complete iteration `iteration`: `iter_X`, or `iter_X.old` between the renames."""
    final = checkpoint_dir(root, iteration)
    if not os.path.isdir(final) and os.path.isdir(final + ".old"):
        return final + ".old"
    return final


def committed_file(root: str, iteration: int, tp_rank: int, pp_rank: Optional[int]) -> str:
    return os.path.join(committed_dir(root, iteration), rank_file_relpath(tp_rank, pp_rank))


# ---- ranks and the file system ----------------------------------------------------------------------
def _barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_ranks_ok(ok: bool, group=None) -> bool:
    """True when `ok` holds on every rank; the collective every rank calls where a barrier would hang
    the healthy ranks if one of them failed. `group`: a gloo group (an asynchronous save's), else the
    default group on this rank's device."""
    if not dist.is_initialized():
        return ok
    from megatron.core import parallel_state  # the device of this rank's backend (CPU for gloo)

    device = "cpu" if group is not None else (parallel_state.get_device() or "cpu")
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return bool(flag.item() == 0.0)


def _fsync_dir(path: str) -> None:
    """Make a rename durable (a node crash after it must not bring the old name back)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder; the rename is still atomic
        pass
    finally:
        os.close(fd)


def write_durably(obj, path: str) -> None:
    """torch.save through `path.part`, fsynced, then renamed: `path` is whole or absent, never half written."""
    with open(path + ".part", "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".part", path)


def write_json_durably(obj, path: str) -> None:
    """`write_durably` for plain values, as JSON (what a torch_dist checkpoint keeps beside its shards)."""
    with open(path + ".part", "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".part", path)


def incomplete_saves(root: str) -> List[str]:
    """Folders left by interrupted saves (`iter_X.tmp`), which are never loaded."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if parse_iteration_dir(n) is not None and n.endswith(".tmp"))


def clear_interrupted_saves(root: str) -> List[str]:
    """Rank 0, before a save: remove `iter_*.tmp`, settle `iter_*.old`; returns what it did, to report."""
    notes = []
    for name in sorted(os.listdir(root)):
        parsed = parse_iteration_dir(name)
        path = os.path.join(root, name)
        if name == TRACKER + ".tmp":
            os.remove(path)
        if parsed is None or not parsed[1] or not os.path.isdir(path):
            continue
        final = checkpoint_dir(root, parsed[0])
        if parsed[1] == "tmp":
            notes.append(f"removed {path}: an interrupted save, never loaded")
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.isdir(final):  # a re-save committed; its predecessor was not yet removed
            shutil.rmtree(path, ignore_errors=True)
        else:  # killed between the two renames of a re-save: the old copy is the committed one
            os.replace(path, final)
            notes.append(f"restored {final} from {name}")
    if notes:
        _fsync_dir(root)
    return notes


# ---- saving ---------------------------------------------------------------------------------------
def check_save_dir(root: Optional[str]) -> None:
    """Start-up check of --save: creatable and writable, so a run does not train for hours first.
    Creates nothing (a run that fails at start-up leaves no files)."""
    if not root:
        return
    path = os.path.abspath(root)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise UserError(f"--save {root}: {path} is a file, not a folder")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"--save {root}: {path} is not writable")


def save_checkpoint(root: str, iteration: int, state: dict, tp_rank: int = 0, pp_rank: Optional[int] = None,
                    writer: bool = True, report: Callable[[str], None] = print,
                    extra_files: Optional[Dict[str, dict]] = None) -> str:
    """Write this rank's `state` as iteration `iteration` under `root`; every rank calls it.

    Ranks with `writer` (data-parallel rank 0 of each (tp, pp) pair) write their file, and `extra_files`
    ({file name: contents}, e.g. `distrib_optim.pt`) beside it, under the same protocol. Returns the final
    path of this rank's file. A failed write on any rank raises UserError on every rank and leaves the
    previous checkpoint and the tracker as they were.
    """
    rel = rank_file_relpath(tp_rank, pp_rank)

    def write(tmp_dir: str) -> None:
        if writer:
            tmp_file = os.path.join(tmp_dir, rel)
            os.makedirs(os.path.dirname(tmp_file), exist_ok=True)
            write_durably({"checkpoint_version": CHECKPOINT_VERSION, "iteration": iteration, **state}, tmp_file)
            for name, contents in (extra_files or {}).items():
                write_durably(contents, os.path.join(os.path.dirname(tmp_file), name))

    finish_save(root, iteration, write, begin_save(root, report))
    return os.path.join(checkpoint_dir(root, iteration), rel)


def begin_save(root: str, report: Callable[[str], None] = print, group=None) -> Optional[BaseException]:
    """Step 1 on rank 0, then a barrier: returns the error of rank 0 (None elsewhere), for `finish_save`."""
    error = None
    if _is_rank0():
        try:
            os.makedirs(root, exist_ok=True)
            for note in clear_interrupted_saves(root):
                report(f"WARNING: {note}")
        except OSError as e:
            error = e
    _barrier(group)
    return error


def finish_save(root: str, iteration: int, write: Callable[[str], None], error: Optional[BaseException] = None,
                group=None) -> None:
    """Steps 2-6: every rank calls `write(iter_X.tmp)`, they agree, rank 0 commits, they agree again. Runs
    in an asynchronous save's thread too, then with that save's gloo `group` for the agreements."""
    tmp_dir = checkpoint_dir(root, iteration) + ".tmp"
    if error is None:
        try:
            os.makedirs(tmp_dir, exist_ok=True)
            write(tmp_dir)
        except Exception as e:  # noqa: BLE001 - every rank must reach the agreement below, or the others hang
            error = e
    if not all_ranks_ok(error is None, group):
        _fail_save(root, iteration, tmp_dir, error, group)
    if _is_rank0():
        _fsync_dir(tmp_dir)
        error = _commit(root, iteration, tmp_dir, checkpoint_dir(root, iteration))
    if not all_ranks_ok(error is None, group):  # also the barrier: no rank returns before the commit
        _fail_save(root, iteration, tmp_dir, error, group)


def _commit(root: str, iteration: int, tmp_dir: str, final_dir: str) -> Optional[BaseException]:
    """Steps 4-6 on rank 0; returns the error instead of raising, so every rank learns the outcome. A
    failure before the tracker moved (a full disk under the tracker's temporary file) undoes the renames:
    the new folder goes back to `.tmp` (never loaded), the old copy of a re-save back to its name."""
    aside = final_dir + ".old"
    tracker_tmp = os.path.join(root, TRACKER + ".tmp")
    moved_old = moved_new = False
    try:
        if os.path.isdir(final_dir):  # re-saving this iteration: keep the old copy until the commit
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(final_dir, aside)
            moved_old = True
        os.replace(tmp_dir, final_dir)
        moved_new = True
        _fsync_dir(root)
        with open(tracker_tmp, "w") as f:
            f.write(str(iteration))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tracker_tmp, os.path.join(root, TRACKER))
    except Exception as e:  # noqa: BLE001 - the other ranks wait for this outcome in all_ranks_ok
        try:
            if moved_new:
                os.replace(final_dir, tmp_dir)
            if moved_old:
                os.replace(aside, final_dir)
            if os.path.exists(tracker_tmp):
                os.remove(tracker_tmp)
        except OSError:
            pass  # what is left, the next save's step 1 settles (.tmp removed, .old restored)
        return e
    _fsync_dir(root)
    shutil.rmtree(aside, ignore_errors=True)
    return None


def _fail_save(root: str, iteration: int, tmp_dir: str, error: Optional[BaseException], group=None) -> None:
    """Every rank, once they agreed that the save failed: rank 0 removes the temporary folder, then each
    raises one line (the cause on the failing rank, "on another rank" elsewhere)."""
    if _is_rank0():
        shutil.rmtree(tmp_dir, ignore_errors=True)
    _barrier(group)
    if error is not None and not isinstance(error, OSError):
        raise error  # a bug, not the disk: keep its traceback
    where = f" ({error.strerror or error})" if error is not None else " on another rank"
    previous = read_tracker_or_none(root)
    kept = f"the checkpoint of iteration {previous} is intact" if previous is not None else "nothing was saved"
    raise CheckpointWriteError(f"cannot write the checkpoint of iteration {iteration} to {root}{where}; {kept}")


def write_checkpoint_files(root: str, iteration: int, files: Dict[str, dict],
                           report: Callable[[str], None] = print) -> None:
    """One process writes a whole checkpoint (tools/checkpoint_util.py writes every rank's file itself):
    `files` maps a path relative to `iter_X/` to its contents. Same protocol as `save_checkpoint`:
    leftovers settled, each file through an fsynced `.part` under `iter_X.tmp`, then the commit. On a
    failure the partial folder is removed and the previous checkpoint stays loadable; the error (an
    OSError for the disk) is re-raised for the caller to word."""
    final_dir = checkpoint_dir(root, iteration)
    tmp_dir, error = final_dir + ".tmp", None
    try:
        os.makedirs(root, exist_ok=True)
        for note in clear_interrupted_saves(root):
            report(f"WARNING: {note}")
        for rel, payload in files.items():
            path = os.path.join(tmp_dir, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_durably(payload, path)
    except BaseException as e:  # noqa: BLE001 - also on Ctrl-C: no partial folder stays behind
        error = e
    if error is None:
        error = _commit(root, iteration, tmp_dir, final_dir)  # undoes its renames when it fails
    if error is not None:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise error


# ---- reading --------------------------------------------------------------------------------------
def saved_layout(root: str, iteration: int) -> Optional[tuple]:
    """(tensor, pipeline) parallel sizes of a checkpoint, read off its rank folders; None if it has none."""
    folder = committed_dir(root, iteration)
    return parallel_sizes(os.listdir(folder) if os.path.isdir(folder) else [])


def read_tracker(root: str) -> Optional[int]:
    """The latest complete iteration under `root`, or None when there is no checkpoint yet."""
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        return None
    with open(tracker) as f:
        text = f.read().strip()
    if not text.isdigit():
        fix = megatron_lm.RELEASE_HINT if text == "release" else "fix or delete it"
        raise UserError(f"{tracker} holds {text[:40]!r}, not an iteration number; {fix}")
    return int(text)


def read_tracker_or_none(root: str) -> Optional[int]:
    try:
        return read_tracker(root)
    except (UserError, OSError):
        return None


def complete_iterations(root: str) -> List[int]:
    """Iterations with a committed folder under `root`, newest first (whatever the tracker says)."""
    if not os.path.isdir(root):
        return []
    found = set()
    for name in os.listdir(root):
        parsed = parse_iteration_dir(name)
        if parsed and parsed[1] != "tmp" and os.path.isdir(os.path.join(root, name)):
            found.add(parsed[0])
    return sorted(found, reverse=True)


def _refuse_payload(path: str, name: str) -> None:
    raise UserError(f"refused checkpoint {path}: it holds a pickled Python object ({name}), which is never run; "
                    "checkpoints hold only tensors, plain values and (Megatron-LM's) argparse.Namespace args") from None


def _unsafe_globals(path: str) -> List[str]:
    """The classes and functions a file's pickle names outside torch's allowlist, read without running
    anything; [] when torch cannot list them (a damaged or old-format file: torch.load reports it)."""
    try:
        return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001
        return []


def torch_load(path: str, mmap: bool = False) -> dict:
    """torch.load with weights_only=True; a pickled payload or a damaged file becomes a one-line UserError.

    Besides tensors and plain values, a Megatron-LM file's argparse.Namespace loads, and its enums, numpy
    RNG arrays and TE's BytesIO load as inert records (megatron_lm.py, part 1); any other class or
    function is refused unrun."""
    names = _unsafe_globals(path)
    refused = megatron_lm.refused_globals(names)
    if refused:
        _refuse_payload(path, refused[0])
    try:
        with torch.serialization.safe_globals(megatron_lm.safe_globals(names)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - whatever the file holds, one line and no traceback
        detail = " ".join(str(e).split())
        payload = re.search(r"GLOBAL ([\w.]+\w)", detail)
        if payload:  # weights_only met a class or function reference: code that a full unpickle would run
            _refuse_payload(path, payload.group(1))
        detail = detail.split("WeightsUnpickler error: ")[-1].split(" Check the documentation")[0]
        raise UserError(f"cannot read checkpoint {path} ({type(e).__name__}: {detail[:160]}); the file is "
                        "damaged or was not written by this project") from None


def load_checkpoint(root: str, iteration: Optional[int] = None, tp_rank: int = 0,
                    pp_rank: Optional[int] = None) -> Optional[dict]:
    """Load this rank's file of the latest (or the given) checkpoint under `root` on CPU; None when there
    is no checkpoint yet."""
    if iteration is None:
        iteration = read_tracker(root)
        if iteration is None:
            return None
    path = committed_file(root, iteration, tp_rank, pp_rank)
    if not os.path.isfile(path):
        hint = megatron_lm.other_format_hint(os.path.dirname(os.path.dirname(path)))
        raise UserError(f"checkpoint file {path} is missing; the checkpoint at {root} is incomplete{hint}")
    ckpt = megatron_lm.import_checkpoint(torch_load(path), path)  # one of ours: unchanged
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path} holds a {type(ckpt).__name__}, not a checkpoint dict")
    if ckpt.get("iteration", iteration) != iteration:
        raise UserError(f"checkpoint {path} holds iteration {ckpt.get('iteration')}, not {iteration}: "
                        "folders were renamed or mixed")
    return ckpt


def select_checkpoint(root: str, tp_rank: int = 0, pp_rank: Optional[int] = None, fallback: bool = False,
                      before_load: Callable[[int], None] = lambda it: None,
                      report: Callable[[str], None] = print,
                      read: Optional[Callable[[int], dict]] = None) -> Optional[Tuple[int, dict]]:
    """(iteration, this rank's checkpoint) to resume from, or None when `root` holds no checkpoint.

    The tracker's iteration, when every rank can load its file. Otherwise, with `fallback`, the newest
    older iteration every rank can load (any iteration when the tracker itself is damaged), after
    reporting why each newer one was passed over; without `fallback` the damage is a UserError that
    names the file and the iterations a fallback could use. Without a tracker: the newest complete
    iteration. `before_load(iteration)` may raise a UserError for checkpoints that are intact but
    unusable (another parallel layout). `read(iteration)` loads one (default: this rank's legacy file);
    it raises UserError for a damaged one.
    """
    if read is None:
        read = lambda it: load_checkpoint(root, it, tp_rank, pp_rank)  # noqa: E731
    on_disk = complete_iterations(root)
    try:
        tracked, problem = read_tracker(root), None
    except (UserError, OSError) as e:
        tracked, problem = None, str(e)
    if tracked is None and problem is None:
        if not on_disk:
            return None
        # A save killed between its folder rename and its tracker (the first save of a run), or a lost
        # tracker: complete folders exist only after every rank's write succeeded, so take the newest.
        report(f"WARNING: {os.path.join(root, TRACKER)} is missing; resuming from the newest complete iteration, "
               f"{on_disk[0]}")
        candidates = on_disk
    elif problem is None:
        candidates = [tracked] + [i for i in on_disk if i < tracked]
    else:
        candidates = [None] + on_disk  # None: the damaged tracker
    for i, iteration in enumerate(candidates):
        ckpt = None
        if iteration is not None:
            before_load(iteration)
            try:
                ckpt, problem = read(iteration), None
            except UserError as e:
                problem = str(e)
        if all_ranks_ok(problem is None):
            return iteration, ckpt
        problem = problem or f"iteration {iteration} in {root} is damaged on another rank (see its message)"
        rest = [c for c in candidates[i + 1:] if c is not None]
        if not fallback:
            hint = (f"; pass --load-fallback to resume from the newest loadable older iteration (on disk: "
                    f"{', '.join(map(str, rest[:4]))})" if rest else "; no older iteration is on disk")
            raise UserError(problem + hint)
        if rest:
            report(f"WARNING: {problem}; --load-fallback: trying iteration {rest[0]}")
    raise UserError(f"no loadable checkpoint in {root}: {problem}")
