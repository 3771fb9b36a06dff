"""tools/evaluate_zeroshot.py end to end on tiny checkpoints and local tasks, offline."""

import json
import os
from pathlib import Path

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
    assert os.listdir(tmp_path) == ["results.json"]  # written aside and renamed: no temporary file left
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
    """Fails before any model work: the checkpoint is never opened."""
    from megatron.evaluation import checkpoint_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what the tool sees on a machine without internet
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    opened = []
    monkeypatch.setattr(checkpoint_model, "load_gpt_checkpoint", lambda *a, **k: opened.append(a))
    assert run_tool(["--load", setup["gpt2"], "--tasks", "tiny_mc,lambada_openai",
                     "--include-path", setup["tasks"]]) == 2
    assert opened == []
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: task(s) lambada_openai ")
    assert "tools/make_local_tasks.py" in err and "--include-path" in err


def no_model_load(monkeypatch):
    """Fail the test if the tool gets as far as loading the checkpoint: its checks must come first."""
    from megatron.evaluation import checkpoint_model

    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the failing check")

    monkeypatch.setattr(checkpoint_model, "load_gpt_checkpoint", refuse)


def test_an_unreachable_hub_is_detected_by_its_socket(setup, monkeypatch, capsys):
    """No offline variables, no proxy: the tool's own probe of huggingface.co:443 decides."""
    tool = load_script("tools/evaluate_zeroshot.py")
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT", *tool.PROXY_VARS):
        monkeypatch.delenv(name, raising=False)
    calls = []

    def unreachable(address, timeout=None, *args):
        calls.append(address)
        raise OSError("Network is unreachable")

    monkeypatch.setattr(tool.socket, "create_connection", unreachable)
    no_model_load(monkeypatch)
    assert tool.hub_reachable() is False and calls == [("huggingface.co", 443)]
    assert run_tool(["--load", setup["gpt2"], "--tasks", "lambada_openai"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "need the Hugging Face Hub, which this machine cannot reach" in err


def test_offline_a_mistyped_task_is_unknown_not_missing_data(setup, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    no_model_load(monkeypatch)
    assert run_tool(["--load", setup["gpt2"], "--tasks", "tiny_mc,lambda_openai,piqa",
                     "--include-path", setup["tasks"]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: unknown task(s) lambda_openai:")


def test_an_unwritable_output_path_fails_before_the_evaluation(setup, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("")
    no_model_load(monkeypatch)
    assert run_tool(["--load", setup["gpt2"], "--tasks", "tiny_mc", "--include-path", setup["tasks"],
                     "--output-path", str(tmp_path / "file" / "out" / "results.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --output-path") and "is a file, not a folder" in err
    assert os.listdir(tmp_path) == ["file"]


@pytest.mark.parametrize("tool,argv", [
    ("tools/evaluate_zeroshot.py", ["--load", "x", "--tasks", "a", "--bogus"]),
    ("tools/evaluate_zeroshot.py", ["--load", "x", "--tasks", "a", "--limit", "-1"]),
    ("tools/convert_checkpoint_to_hf.py", ["--load", "x", "--output-dir", "y", "--dtype", "int8"]),
    ("tools/make_local_tasks.py", ["--data-dir", "d", "--output-dir", "o", "--bogus"]),
])
def test_a_bad_flag_is_one_error_line_and_exit_2(tool, argv, capsys):
    assert run_cli(load_script(tool).main, argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("error: "), err
    assert "usage:" not in err


def test_bad_flags_are_one_line_errors(setup, tmp_path, capsys):
    assert run_tool(["--load", setup["gpt2"], "--tasks", " , "]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --tasks is empty; pass comma-separated lm-eval task names"]
    assert run_tool(["--load", setup["gpt2"], "--tasks", "tiny_mc", "--include-path", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: --include-path {tmp_path / 'x'}: no such folder"]


def test_example_script_runs_the_gpt3_tasks_with_the_callers_paths(tmp_path):
    """The script's task list is make_local_tasks' GPT-3 set, each a real lm-eval task, and relative paths
    are the caller's (a stand-in interpreter records what the script would run, from where)."""
    import subprocess

    from tests.scripts import REPO

    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$PWD" "$@" > "$DUMP"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PYTHON="./python", TASKS_DIR="tasks", DUMP=str(tmp_path / "argv"))
    subprocess.run(["bash", str(REPO / "examples" / "evaluate_zeroshot_gpt.sh"), "ckpt", "out/r.json"],
                   cwd=tmp_path, env=env, check=True)
    cwd, script, *argv = (tmp_path / "argv").read_text().splitlines()
    assert (cwd, script) == (str(REPO), "tools/evaluate_zeroshot.py")
    flags = dict(zip(argv[::2], argv[1::2]))
    assert flags["--load"] == str(tmp_path / "ckpt") and flags["--output-path"] == str(tmp_path / "out" / "r.json")
    assert flags["--include-path"] == str(tmp_path / "tasks") and flags["--num-fewshot"] == "0"

    import lm_eval.tasks

    tool = load_script("tools/make_local_tasks.py")
    tasks = flags["--tasks"].split(",")
    assert tasks == list(tool.GPT3_TASKS)
    root = Path(lm_eval.tasks.__file__).parent
    for name in tasks:  # the table's YAML is the lm-eval file that declares that name
        path = root / tool.GPT3_TASKS[name][0]
        assert path.is_file(), path
        with open(path) as f:
            assert tool.yaml.load(f, Loader=tool._TaskYamlLoader)["task"] == name
