"""tools/plot_runs.py: reads --log-json files as the trainer writes them, draws the four PNGs, and reports
bad input in one line without leaving a half-written picture."""

import json
import os
import subprocess
import sys

import pytest

from megatron.core.errors import UserError
from tests.scripts import REPO, load_script

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(path, records):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return str(path)


def train_rec(it, loss, lt, r, ms=100.0, t=None):
    rec = {"iteration": it, "lm_loss": loss, "consumed_layer_tokens": lt, "kept_length": r,
           "elapsed_ms_per_iteration": ms}
    if t is not None:
        rec["train_time_s"] = t
    return rec


@pytest.fixture
def logs(tmp_path):
    dense = write_log(tmp_path / "dense" / "metrics.jsonl", [
        train_rec(2, 5.0, 400, 8, t=0.2), {"iteration": 2, "val_loss": 5.1, "consumed_layer_tokens": 400,
                                           "train_time_s": 0.2},
        train_rec(4, 4.0, 800, 8, t=0.4), {"iteration": 4, "val_loss": 4.2, "consumed_layer_tokens": 800,
                                           "train_time_s": 0.4}])
    # an older log: no train_time_s anywhere, validation records without counters, appended to by a resume
    ltd = write_log(tmp_path / "ltd" / "metrics.jsonl", [
        train_rec(2, 5.5, 300, 4, ms=50.0), train_rec(4, 9.9, 600, 6, ms=50.0), {"iteration": 4, "val_loss": 9.9},
        train_rec(4, 4.5, 600, 6, ms=60.0), {"iteration": 4, "val_loss": 4.6}, train_rec(6, 4.1, 950, 8, ms=70.0)])
    return dense, ltd


def test_reads_logs_fills_older_fields_and_keeps_the_last_record_of_an_iteration(logs):
    tool = load_script("tools/plot_runs.py")
    run = tool.read_run(logs[1])
    assert [r["iteration"] for r in run["train"]] == [2, 4, 6]
    assert run["train"][1]["lm_loss"] == 4.5 and run["val"][0]["val_loss"] == 4.6  # the resumed run's records
    # time rebuilt from the per-iteration averages: 2 x 50 ms, then 2 x 60 ms, then 2 x 70 ms
    assert [r["train_time_s"] for r in run["train"]] == pytest.approx([0.1, 0.22, 0.36])
    assert run["val"][0]["consumed_layer_tokens"] == 600 and run["val"][0]["train_time_s"] == pytest.approx(0.22)
    assert tool.default_label(logs[0]) == "dense"


def test_writes_the_four_pngs(logs, tmp_path):
    out = tmp_path / "plots"
    proc = subprocess.run([sys.executable, "tools/plot_runs.py", *logs, "--labels", "dense B,LTD 2B/3",
                           "--output-dir", str(out), "--title", "tiny"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    names = sorted(os.listdir(out))
    assert names == sorted(f"{n}.png" for n in load_script("tools/plot_runs.py").PLOTS)
    for name in names:
        with open(out / name, "rb") as f:
            assert f.read(8) == PNG_MAGIC
    assert proc.stdout.count("wrote ") == 4


@pytest.mark.parametrize("case, needle", [
    ("missing", "no such file"),
    ("not json", "line 1 is not JSON"),
    ("no train", "holds no training records"),
    ("labels", "--labels names 1 runs but 2 log files"),
])
def test_bad_input_is_one_line_and_writes_nothing(logs, tmp_path, case, needle):
    tool = load_script("tools/plot_runs.py")
    bad = tmp_path / "bad.jsonl"
    if case == "not json":
        bad.write_text("iteration 1\n")
    if case == "no train":
        write_log(bad, [{"iteration": 1, "val_loss": 3.0}])
    argv = {"missing": [str(tmp_path / "nope.jsonl")], "not json": [str(bad)], "no train": [str(bad)],
            "labels": [*logs, "--labels", "one"]}[case]
    out = tmp_path / "plots"
    with pytest.raises(UserError, match=needle):
        tool.main(argv + ["--output-dir", str(out)])
    assert not out.exists()
    proc = subprocess.run([sys.executable, "tools/plot_runs.py", *argv, "--output-dir", str(out)], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")


def test_reads_logs_written_before_r_was_named_kept_length(tmp_path):
    tool = load_script("tools/plot_runs.py")
    old = {"iteration": 2, "lm_loss": 5.0, "consumed_layer_tokens": 400, "ltd_seq_length": 8,
           "elapsed_ms_per_iteration": 100.0}
    run = tool.read_run(write_log(tmp_path / "old" / "metrics.jsonl", [old]))
    assert run["train"][0]["kept_length"] == 8
