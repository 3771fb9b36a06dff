"""A save killed at any moment, or failing (full disk), leaves the tracker and the checkpoint it names
loadable; a --save that cannot work is refused at start-up."""

import json
import os
import subprocess
import sys

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
    assert len({tuple(x) for x in out["loaded"]}) >= 5  # and the saves made progress across trials


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
    argv = TINY + NO_EVAL + ["--train-iters", "2", "--save", str(tmp_path / "file" / "ck"),
                             "--log-json", str(tmp_path / "m.jsonl")]
    assert run_inprocess(argv) == 2
    assert capsys.readouterr().err == f"error: --save {tmp_path}/file/ck: {tmp_path}/file is a file, not a folder\n"
    assert sorted(os.listdir(tmp_path)) == ["file"]
