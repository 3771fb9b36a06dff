"""tools/evaluate_zeroshot.py end to end on tiny checkpoints and local tasks, offline."""

import json
import time

import pytest

from megatron.evaluation.checkpoint_model import load_gpt_checkpoint
from megatron.evaluation.lm_eval_adapter import MegatronGPTLM
from megatron.training.cli import run_cli
from tests.scripts import load_script
from tests.unit.evaluation import fixtures
from tests.unit.evaluation.test_make_local_tasks import DOCS, write_data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return fixtures.tiny_setup(tmp_path_factory)


def run_tool(argv):
    return run_cli(load_script("tools/evaluate_zeroshot.py").main, argv)


def test_four_request_types_print_the_table_and_write_the_json(setup, tmp_path, capsys):
    out = tmp_path / "results.json"
    argv = ["--load", setup["llama"], "--tasks", ",".join(fixtures.TASKS), "--include-path", setup["tasks"],
            "--batch-size", "3", "--bootstrap-iters", "0", "--output-path", str(out)]
    assert run_tool(argv) == 0
    printed = capsys.readouterr().out
    assert "|tiny_mc" in printed and "word_perplexity" in printed and f"wrote {out}" in printed
    written = json.load(open(out))
    assert sorted(written["results"]) == sorted(fixtures.TASKS)
    gpt = load_gpt_checkpoint(setup["llama"])  # the same numbers as lm-eval driven directly
    direct = fixtures.evaluate(MegatronGPTLM(gpt.model, gpt.tokenizer), setup["tasks"])
    assert fixtures.metrics(written) == pytest.approx(fixtures.metrics(direct))


def test_standard_task_names_with_local_data(setup, tmp_path, capsys):
    data = write_data(tmp_path / "data")
    names = [n.split("/")[0] for n in DOCS]
    assert load_script("tools/make_local_tasks.py").main(
        ["--data-dir", str(data), "--output-dir", str(tmp_path / "tasks")]) == 0
    assert run_tool(["--load", setup["gpt2"], "--tasks", ",".join(names), "--include-path", str(tmp_path / "tasks"),
                     "--limit", "2", "--output-path", str(tmp_path)]) == 0
    results = json.load(open(tmp_path / "results.json"))
    assert sorted(results["results"]) == sorted(names)
    assert all(n["effective"] <= 2 for n in results["n-samples"].values())


def test_without_the_hub_a_standard_task_fails_fast_with_one_line(setup, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what the tool sees on a machine without internet
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    start = time.time()
    assert run_tool(["--load", setup["gpt2"], "--tasks", "tiny_mc,lambada_openai",
                     "--include-path", setup["tasks"]]) == 2
    assert time.time() - start < 5
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: task(s) lambada_openai ")
    assert "tools/make_local_tasks.py" in err and "--include-path" in err


def test_bad_flags_are_one_line_errors(setup, tmp_path, capsys):
    assert run_tool(["--load", setup["gpt2"], "--tasks", " , "]) == 2
    assert run_tool(["--load", setup["gpt2"], "--tasks", "tiny_mc", "--include-path", str(tmp_path / "x")]) == 2
    assert "no such folder" in capsys.readouterr().err
