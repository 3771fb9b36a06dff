"""A save killed at any moment, or failing (full disk), leaves the tracker and the checkpoint it names
loadable; a --save that cannot work is refused at start-up."""

import errno
import json
import os
import subprocess
import sys

import pytest
import torch

from megatron.checkpoint import protocol as ck
from tests.distributed.launcher import run_distributed
from tests.functional.gpt_cli import REPO
from tests.reliability.common import NO_EVAL, TINY, run_inprocess, tree

KILL = os.path.join(REPO, "tests/reliability/kill_saves.py")


def kill_saves(*args):
    proc = subprocess.run([sys.executable, KILL, *map(str, args)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_kill_9_at_random_moments_of_repeated_saves(tmp_path):
    """120 SIGKILLs at random times into a loop of saves and re-saves: the latest always loads, whole."""
    out = kill_saves("random", tmp_path, 120, 1234)
    assert out["problems"] == []
    assert out["killed_mid_save"] >= 20  # the kills did land inside saves, not only between them
    # and the saves made progress across trials (None: killed before the first save completed)
    assert len({tuple(x) for x in out["loaded"] if x is not None}) >= 5


def test_crash_before_every_step_of_a_save(tmp_path):
    """The child dies just before each file-system call of a save: the first into an empty folder, a new
    iteration, a re-save of the tracker's iteration. The old or the new checkpoint loads (or none, before
    the first one exists), and the next save cleans up."""
    out = kill_saves("steps", tmp_path)
    assert out["problems"] == []
    assert out["first"]["steps"] >= 10 and out["first"]["loaded"] == [[1, 2], None]
    assert out["new"]["steps"] >= 10 and out["new"]["loaded"] == [[1, 1], [2, 2]]
    assert out["resave"]["steps"] >= 10 and out["resave"]["loaded"] == [[1, 1], [1, 2]]


def test_full_disk_during_a_save(tmp_path, capsys, monkeypatch):
    import torch

    ck, real, calls = tmp_path / "ck", torch.save, []

    def second_save_fails(obj, f):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"partial")
            raise OSError(28, "No space left on device")
        real(obj, f)

    monkeypatch.setattr(torch, "save", second_save_fails)
    argv = TINY + NO_EVAL + ["--train-iters", "6", "--save-interval", "2", "--save", str(ck)]
    assert run_inprocess(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [(f"error: cannot write the checkpoint of iteration 4 to {ck} (No space left on device); "
                    "the checkpoint of iteration 2 is intact")]
    assert tree(ck) == ["iter_0000002/mp_rank_00/model_optim_rng.pt", "latest_checkpointed_iteration.txt"]


def test_unusable_save_folder_is_refused_at_start_up(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    argv = TINY + NO_EVAL + ["--train-iters", "3", "--save", str(tmp_path / "file" / "ck"),
                             "--log-json", str(tmp_path / "m.jsonl")]
    assert run_inprocess(argv) == 2
    assert capsys.readouterr().err == f"error: --save {tmp_path}/file/ck: {tmp_path}/file is a file, not a folder\n"
    assert sorted(os.listdir(tmp_path)) == ["file"]


def fail_replace_once(when):
    """Patch os.replace to raise ENOSPC the first time `when(src, dst)` holds; returns the calls that failed."""
    real, failed = os.replace, []

    def replace(src, dst, *args, **kwargs):
        if not failed and when(str(src), str(dst)):
            failed.append((str(src), str(dst)))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *args, **kwargs)

    return replace, failed


def weights(version):
    return {"model": {"w": torch.full((4,), float(version))}}


def saved_version(root):
    iteration, ckpt = ck.select_checkpoint(str(root), report=lambda m: None)
    return iteration, float(ckpt["model"]["w"][0])


def TRACKER_RENAME(src, dst):  # step 5, the commit
    return dst.endswith(ck.TRACKER)


def FOLDER_RENAME(src, dst):  # step 4, iter_0000001.tmp -> iter_0000001 (after the old copy moved aside)
    return src.endswith(".tmp") and dst.endswith("iter_0000001")


@pytest.mark.parametrize("start, iteration, when, before", [
    (None, 1, TRACKER_RENAME, None),
    (1, 2, TRACKER_RENAME, (1, 1.0)),
    (1, 1, TRACKER_RENAME, (1, 1.0)),
    (1, 1, FOLDER_RENAME, (1, 1.0)),
], ids=["first-save-tracker", "new-iteration-tracker", "re-save-tracker", "re-save-folder-rename"])
def test_failed_commit_on_rank_0_is_undone_and_reported(tmp_path, monkeypatch, start, iteration, when, before):
    """Rank 0's folder renames and tracker write fail like any write: one line, the renames undone, the
    previous checkpoint (or none) is what loads, and the next save goes through and leaves no leftovers."""
    root = tmp_path / "ck"
    if start:
        ck.save_checkpoint(str(root), start, weights(1.0), report=lambda m: None)
    replace, failed = fail_replace_once(when)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ck.CheckpointWriteError) as e:
        ck.save_checkpoint(str(root), iteration, weights(2.0), report=lambda m: None)
    monkeypatch.undo()
    assert failed, "the failure was not injected"
    kept = "nothing was saved" if before is None else f"the checkpoint of iteration {before[0]} is intact"
    assert str(e.value) == (f"cannot write the checkpoint of iteration {iteration} to {root} (No space left on "
                            f"device); {kept}")
    assert tree(root) == ([] if before is None else [f"iter_{before[0]:07d}/mp_rank_00/model_optim_rng.pt",
                                                     ck.TRACKER])
    assert (ck.select_checkpoint(str(root)) if before is None else saved_version(root)) == before
    ck.save_checkpoint(str(root), iteration, weights(3.0), report=lambda m: None)
    assert saved_version(root) == (iteration, 3.0)
    assert not [n for n in os.listdir(root) if n.endswith((".tmp", ".old"))]


def _commit_fails_on_rank_0(rank, world, root, out):
    ck.save_checkpoint(root, 1, weights(1.0), tp_rank=rank, report=lambda m: None)
    if rank == 0:
        os.replace = fail_replace_once(TRACKER_RENAME)[0]  # this forked rank only
    try:
        ck.save_checkpoint(root, 2, weights(2.0), tp_rank=rank, report=lambda m: None)
        message = "saved"
    except ck.CheckpointWriteError as e:
        message = str(e)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(message)


def test_failed_commit_on_rank_0_fails_the_save_on_every_rank(tmp_path):
    """Rank 1 waits for rank 0's commit; a failed commit must reach it as the same error, not a hang."""
    root = str(tmp_path / "ck")
    run_distributed(_commit_fails_on_rank_0, world_size=2, args=(root, str(tmp_path)), hang_after_s=300)
    head, kept = f"cannot write the checkpoint of iteration 2 to {root}", "the checkpoint of iteration 1 is intact"
    assert (tmp_path / "rank0.txt").read_text() == f"{head} (No space left on device); {kept}"
    assert (tmp_path / "rank1.txt").read_text() == f"{head} on another rank; {kept}"
    assert tree(root) == ["iter_0000001/mp_rank_00/model_optim_rng.pt", "iter_0000001/mp_rank_01/model_optim_rng.pt",
                          ck.TRACKER]


def test_kill_9_during_asynchronous_torch_dist_saves(tmp_path):
    """A training run saving torch_dist checkpoints asynchronously every iteration, killed 10 times at
    random moments and resumed each time: the tracker always names a checkpoint whose shards, model and
    optimizer state read back whole, and the run keeps moving forward."""
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests/reliability/kill_async_saves.py"),
                           str(tmp_path / "ck"), "10", "4321"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["problems"] == []
    assert out["killed_mid_save"] >= 5  # the kills landed inside asynchronous writes
    assert len({x for x in out["loaded"] if x is not None}) >= 5  # and the resumed runs made progress
