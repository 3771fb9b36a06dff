"""Bit-for-bit what the code before the seams refactor (issue 11) did: see scenarios.py.

The numbers in golden.json were recorded by `python -m tests.golden.scenarios record --repo <old checkout>`
at commit 114f492; these tests rerun the same scenarios on this checkout. Exact float equality is the
point: a refactor that changes no arithmetic changes no bit.
"""

import json
import os
import sys

from tests.golden import scenarios

REPO = os.path.dirname(os.path.dirname(scenarios.HERE))


def golden():
    with open(scenarios.GOLDEN) as f:
        return json.load(f)


def test_quickstart_first_50_iterations_and_data_bytes(tmp_path):
    got, want = scenarios.quickstart(REPO, str(tmp_path)), golden()["quickstart"]
    assert got["data_sha256"] == want["data_sha256"]
    assert got["train"] == want["train"]
    assert got["validation"] == want["validation"]


def test_tp2_pp2_random_ltd_run(tmp_path):
    got, want = scenarios.tp2pp2(REPO, str(tmp_path)), golden()["tp2pp2"]
    assert got == want


def test_checkpoint_of_the_old_code_resumes_exactly(tmp_path):
    """The fixture is the old code's checkpoint of iteration 4; resumed here, iterations 5-8 are the old
    uninterrupted run's."""
    log = str(tmp_path / "resumed.jsonl")
    scenarios._run([sys.executable, "pretrain_gpt_ltd.py", *scenarios.RESUME, "--load", scenarios.FIXTURE,
                    "--save", str(tmp_path / "ckpt"), "--log-json", log], REPO)
    got, want = scenarios._records(log)["train"], golden()["resume"]["train"]
    assert [r["iteration"] for r in got] == [5, 6, 7, 8]
    assert got == want[4:]
