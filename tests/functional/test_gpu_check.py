"""bench/gpu_check.sh runs end to end: its --cpu-smoke mode is the GPU script with tiny shapes on the CPU
(every step, the trainer with --torch-compile included), so a GPU session finds a script that works.

The slowest functional test here (~50 s on 2 cores: three compiled trainer runs and two ltd_step_time runs).
"""

import os
import subprocess
import sys

from tests.functional.gpt_cli import REPO, read_json_lines


def gpu_check(out, *args):
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(["bash", os.path.join(REPO, "bench", "gpu_check.sh"), *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_cpu_smoke_runs_every_step_into_a_fresh_folder_of_few_files(tmp_path):
    out = tmp_path / "out"
    proc = gpu_check(out, "--cpu-smoke")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(os.listdir(out))
    assert files == ["r16.jsonl", "r32.jsonl", "r64.jsonl", "run.log", "summary.md"]  # at most 7
    summary = (out / "summary.md").read_text()
    assert "FAILED" not in summary and "SKIPPED" not in summary, summary
    for heading in ("## 0. Random-LTD draw", "## 1. SDPA backend", "## 2. bench/ltd_step_time.py", "## 3. The trainer"):
        assert heading in summary
    draw = summary.split("## 0. Random-LTD draw")[1].split("## 1.")[0]
    assert draw.count("| identical |") == 3 and "DIFFERENT" not in draw, draw
    assert "aten::_scaled_dot_product" in summary  # which kernel ran, per dropout and length
    section = summary.split("## 3. The trainer")[1]
    trainer = [line for line in section.splitlines() if line.startswith(("| 64 |", "| 32 |", "| 16 |"))]
    assert len(trainer) == 3 and all("nan" not in line for line in trainer), trainer
    for name in ("r64", "r32", "r16"):
        recs = [r for r in read_json_lines(out / f"{name}.jsonl") if "lm_loss" in r]
        assert [r["iteration"] for r in recs] == [1, 2, 3]  # one run's records, nothing appended
        assert "throughput_tflops" in recs[-1] and "mfu" in recs[-1] and "optimizer" in recs[-1]["timers_ms"]


def test_an_existing_output_folder_is_refused(tmp_path):
    (tmp_path / "old").mkdir()
    proc = gpu_check(tmp_path / "old", "--cpu-smoke")
    assert proc.returncode == 1 and "exists: give a fresh OUT" in proc.stderr
    assert os.listdir(tmp_path / "old") == []
