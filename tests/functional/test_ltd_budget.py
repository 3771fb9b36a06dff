"""tools/ltd_budget.py: the paper's GPT-3 1.3B plan (also from the recipe's own command line), the JSON
contract, agreement with the trainer's stop rule, dense equivalence, error exits."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.scripts import load_script

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "ltd_budget.py"
ltd_budget = load_script("tools/ltd_budget.py")

MODEL = ["--num-layers", "24", "--seq-length", "2048", "--global-batch-size", "512"]
LTD = ["--random-ltd", "--random-ltd-start-seq-length", "128", "--random-ltd-seq-step", "16",
       "--random-ltd-ramp-iters", "200000", "--random-ltd-layers", "1-22"]
KEYS = {"iterations", "raw_tokens", "layer_tokens", "dense_layer_tokens", "saving", "full_length_iteration"}


def run_json(capsys, *argv):
    assert ltd_budget.main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def recipe_flags(script, tmp_path):
    """The trainer flags a recipe launches, printed by the recipe itself with LAUNCH=echo."""
    env = {"PATH": os.environ["PATH"], "LAUNCH": "echo", "OUT": str(tmp_path)}  # nothing else overrides
    proc = subprocess.run(["bash", str(REPO / "examples" / script)], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    words = shlex.split(proc.stdout)
    assert words[0] == "pretrain_gpt_ltd.py"
    return words[1:]


def assert_paper_1_3b(plan):
    """The reference's GPT-3 1.3B figures: stop at 4800B layer-tokens, ~277.5k iterations, ~291B read."""
    assert plan["iterations"] == 277_389  # reference ~277.5k
    assert plan["raw_tokens"] == 277_389 * 512 * 2048  # 290.9B, reference ~291B
    assert 4800e9 <= plan["layer_tokens"] < 4800.1e9
    assert plan["dense_layer_tokens"] == 24 * plan["raw_tokens"]
    assert plan["saving"] == pytest.approx(1 - plan["layer_tokens"] / plan["dense_layer_tokens"])
    assert plan["full_length_iteration"] == 200_001  # r reaches 2048 after T_r = 200k iterations


def test_paper_gpt3_1_3b_budget(capsys):
    plan = run_json(capsys, *MODEL, *LTD, "--train-layer-tokens", "4800e9", "--baseline-train-tokens", "300e9")
    assert set(plan) == KEYS | {"baseline_layer_tokens", "baseline_saving"}
    assert_paper_1_3b(plan)
    assert plan["baseline_layer_tokens"] == 7200 * 10**9
    assert plan["baseline_saving"] == pytest.approx(1 / 3, abs=1e-4)  # the paper's 33.3%


def test_recipe_command_lines_give_the_paper_plans(capsys, tmp_path):
    """The whole argument string of the recipes (model, optimizer, data, LTD flags) is accepted as is."""
    ltd = recipe_flags("pretrain_gpt_1.3b_ltd.sh", tmp_path)
    assert "--hidden-size" in ltd and "--layer-token-lr-schedule" in ltd and "--micro-batch-size" in ltd
    assert_paper_1_3b(run_json(capsys, *ltd))
    base = run_json(capsys, *recipe_flags("pretrain_gpt_1.3b_baseline.sh", tmp_path))
    assert base["iterations"] == 286_103  # ceil(300e9 / (512 * 2048))
    assert base["layer_tokens"] == base["dense_layer_tokens"] == 24 * base["raw_tokens"] and base["saving"] == 0


def test_iterations_and_layer_token_budget_stop_at_whichever_comes_first(capsys):
    budget = ["--train-layer-tokens", "4800e9"]
    assert run_json(capsys, *MODEL, *LTD, *budget, "--train-iters", "300000")["iterations"] == 277_389
    early = run_json(capsys, *MODEL, *LTD, *budget, "--train-iters", "1000")
    assert early == run_json(capsys, *MODEL, *LTD, "--train-iters", "1000")


def test_default_layers_and_flags_match_explicit_recipe(capsys):
    explicit = run_json(capsys, *MODEL, *LTD, "--train-iters", "250000")
    defaults = run_json(capsys, *MODEL, "--random-ltd", "--random-ltd-ramp-iters", "200000", "--train-iters", "250000")
    assert explicit == defaults
    by_micro = run_json(capsys, *MODEL[:4], "--micro-batch-size", "512", *LTD, "--train-iters", "250000")
    assert by_micro == explicit, "--global-batch-size defaults to --micro-batch-size x one data-parallel rank"


def test_dense_equivalence_without_random_ltd(capsys):
    for length in (["--train-iters", "1000"], ["--train-tokens", "300e9"], ["--train-layer-tokens", "4800e9"]):
        assert ltd_budget.main([*MODEL, *LTD[1:], *length, "--json"]) == 0  # every LTD flag but --random-ltd
        out, err = capsys.readouterr()
        plan = json.loads(out)
        assert set(plan) == KEYS
        assert plan["layer_tokens"] == plan["dense_layer_tokens"] == 24 * 2048 * 512 * plan["iterations"]
        assert plan["saving"] == 0.0 and plan["full_length_iteration"] == 1
        assert err == ("WARNING: --random-ltd-start-seq-length, --random-ltd-seq-step, --random-ltd-ramp-iters, "
                       "--random-ltd-layers ignored: random-LTD is off (add --random-ltd to drop tokens)\n")
    assert run_json(capsys, *MODEL, "--train-tokens", "300e9")["iterations"] == 286_103


def test_lengths_agree(capsys):
    by_iters = run_json(capsys, *MODEL, *LTD, "--train-iters", "1000")
    assert run_json(capsys, *MODEL, *LTD, "--train-samples", "512000") == by_iters
    assert run_json(capsys, *MODEL, *LTD, "--train-tokens", str(1000 * 512 * 2048)) == by_iters
    assert run_json(capsys, *MODEL, *LTD, "--train-layer-tokens", str(by_iters["layer_tokens"])) == by_iters
    assert by_iters["full_length_iteration"] == 200_001 > by_iters["iterations"]


def test_ramp_fraction_of_training_iterations(capsys):
    frac = run_json(capsys, *MODEL, "--random-ltd", "--random-ltd-ramp-fraction", "0.7", "--train-iters", "1000")
    iters = run_json(capsys, *MODEL, "--random-ltd", "--random-ltd-ramp-iters", "700", "--train-iters", "1000")
    assert frac == iters and frac["full_length_iteration"] == 701


def test_text_output(capsys):
    assert ltd_budget.main([*MODEL, *LTD, "--train-layer-tokens", "4800e9", "--baseline-train-tokens", "300e9"]) == 0
    text = capsys.readouterr().out
    for needle in ("random-LTD on layers 1-22 of 24: r 128 -> 2048 in steps of 16 over 200,000 iterations",
                   "iterations:", "277,389", "raw tokens read:", "290.9B", "layer-tokens:", "dense layer-tokens:",
                   "theoretical saving:", "full length at iteration:  200,001", "saving vs baseline:        33.33%"):
        assert needle in text, needle
    assert ltd_budget.main([*MODEL, "--random-ltd", "--random-ltd-layers", "1-3,7,9-10", "--random-ltd-ramp-iters",
                            "10", "--train-iters", "5"]) == 0
    assert "random-LTD on layers 1-3,7,9-10 of 24" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        ([*MODEL, "--train-iters", "10", "--bogus"], "unrecognized arguments"),
        (MODEL, "give the training length"),
        (MODEL[2:] + ["--train-iters", "10"], "a plan needs --num-layers"),
        ([*MODEL, "--train-iters", "10", "--train-tokens", "5"], "give one of --train-iters, --train-samples"),
        ([*MODEL, "--train-iters", "1.5"], "invalid int value"),
        ([*MODEL, "--train-iters", "0"], "--train-iters must be positive"),
        ([*MODEL, "--train-iters", "10", "--baseline-train-tokens", "0"], "not a positive whole number"),
        ([*MODEL, "--random-ltd", "--train-iters", "10"], "--random-ltd-ramp-iters"),
        ([*MODEL, *LTD[:-2], "--random-ltd-layers", "1-24", "--train-iters", "10"], "out of range"),
        ([*MODEL, *LTD, "--random-ltd-start-seq-length", "4096", "--train-iters", "10"], "larger than --seq-length"),
        ([*MODEL, *LTD, "--random-ltd-start-seq-length", "8", "--train-iters", "10"], "smaller than"),
        ([*MODEL, *LTD, "--random-ltd-seq-step", "0", "--train-iters", "10"], "--random-ltd-seq-step"),
        ([*MODEL, "--random-ltd", "--random-ltd-ramp-iters", "0", "--train-iters", "10"], "--random-ltd-ramp-iters"),
        ([*MODEL, "--random-ltd", "--random-ltd-ramp-fraction", "0.7", "--train-layer-tokens", "4800e9"],
         "use --random-ltd-ramp-iters"),
        ([*MODEL, "--random-ltd", "--random-ltd-ramp-fraction", "1.5", "--train-iters", "10"], "(0, 1]"),
    ],
)
def test_errors_are_one_line_exit_2(capsys, argv, message):
    assert ltd_budget.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message in captured.err


def test_cli_subprocess_exit_codes():
    ok = subprocess.run([sys.executable, str(TOOL), *MODEL, *LTD, "--train-iters", "10", "--json"],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and set(json.loads(ok.stdout)) == KEYS
    bad = subprocess.run([sys.executable, str(TOOL), *MODEL, "--train-iters", "10", "--random-ltd-layers", "x",
                          "--random-ltd", "--random-ltd-ramp-iters", "5"], capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: --random-ltd-layers")
    assert "Traceback" not in bad.stderr and bad.stderr.count("\n") == 1
