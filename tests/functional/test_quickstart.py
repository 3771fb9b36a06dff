"""examples/quickstart_cpu.sh end to end, shrunk through its knobs (200 documents, 8 iterations): the
README's first command must keep working, print paths that exist, and log like a random-LTD run."""

import glob
import os
import subprocess
import sys

from tests.functional.gpt_cli import REPO, read_json_lines, train_records

TRAIN_ITERS = 8
KNOBS = {"TRAIN_ITERS": str(TRAIN_ITERS), "MAX_DOCS": "200", "SPLIT": "80,15,5", "LOG_INTERVAL": "2",
         "EVAL_INTERVAL": "4", "EVAL_ITERS": "2", "SAVE_INTERVAL": "4"}


def printed_paths(stdout: str) -> dict:
    """{"training log": path, ...} from the summary the script prints after `done.`."""
    summary = stdout.split("\ndone.\n", 1)[1]
    paths = {}
    for line in summary.splitlines():
        label, sep, rest = line.strip().partition(":")
        if sep and not label.startswith("to train on"):
            paths[label.split(" (")[0]] = rest.split()[0]
    return paths


def test_quickstart_runs_and_prints_paths_that_exist(tmp_path):
    out = tmp_path / "qs"
    env = {**os.environ, **KNOBS, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", "quickstart_cpu.sh")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    paths = printed_paths(proc.stdout)
    assert set(paths) >= {"training log", "metrics", "tensorboard logs", "checkpoint"}, paths
    for label, path in paths.items():
        assert os.path.exists(path), (label, path)
    assert paths["metrics"] == str(out / "metrics.jsonl")
    with open(out / "checkpoints" / "latest_checkpointed_iteration.txt") as f:
        assert f.read().strip() == str(TRAIN_ITERS)
    assert len(glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))) == 1

    with open(paths["training log"]) as f:
        log = f.read()  # step 4's output, tee'd
    assert f"iteration        {TRAIN_ITERS}/       {TRAIN_ITERS} |" in log and "kept length:" in log
    assert "validation loss at iteration 4 on validation set" in log
    assert f"validation loss at iteration {TRAIN_ITERS} on test set" in log

    recs = read_json_lines(out / "metrics.jsonl")
    train = train_records(out / "metrics.jsonl")
    assert [r["iteration"] for r in train] == [2, 4, 6, 8]
    assert [r["iteration"] for r in recs if "val_loss" in r] == [4, 8]
    r = [t["kept_length"] for t in train]  # the MSLG ramp: 128 -> 256 over 70% of the run
    assert r == sorted(r) and r[0] < r[-1] == 256, r
