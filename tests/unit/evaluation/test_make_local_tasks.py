"""tools/make_local_tasks.py: standard task names read local files, offline, keeping lm-eval's prompts."""

import json

import pytest
import yaml

from megatron.core.errors import UserError
from megatron.evaluation.checkpoint_model import load_gpt_checkpoint
from megatron.evaluation.lm_eval_adapter import MegatronGPTLM
from tests.scripts import load_script
from tests.unit.evaluation import fixtures

DOCS = {
    "lambada_openai/test": [{"text": "the cat sat on the mat"}, {"text": "a dog ran under the big tree"}],
    "piqa/validation": [{"goal": "open a door", "sol1": "push it", "sol2": "eat it", "label": 0}] * 3,
    "winogrande/validation": [{"sentence": "The cat sat on the mat because _ was tired.", "option1": "cat",
                               "option2": "mat", "answer": "1"}] * 2,
    "hellaswag/validation": [{"ind": 1, "activity_label": "Cooking", "ctx_a": "A man cooks.", "ctx_b": "he",
                              "ctx": "A man cooks. he", "endings": ["eats.", "runs.", "sleeps.", "sings."],
                              "source_id": "x", "split": "val", "split_type": "indomain", "label": "0"}] * 2,
}


def write_data(root):
    for name, rows in DOCS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        fixtures.write_jsonl(str(root / name) + ".jsonl", rows)
    return root


def test_override_files_include_the_builtin_task_and_point_at_local_data(tmp_path):
    tool = load_script("tools/make_local_tasks.py")
    data = write_data(tmp_path / "data")
    written, skipped = tool.write_tasks(["piqa", "race"], str(data), str(tmp_path / "tasks"))
    assert [p.rsplit("/", 1)[1] for p in written] == ["piqa.yaml"]
    assert "race/test.jsonl" in skipped[0]
    cfg = yaml.safe_load(open(written[0]))
    assert cfg["task"] == "piqa" and cfg["include"].endswith("lm_eval/tasks/piqa/piqa.yaml")
    assert cfg["dataset_kwargs"]["data_files"] == {"validation": str(data / "piqa" / "validation.jsonl")}
    assert cfg["training_split"] is None and cfg["validation_split"] == "validation"
    assert len(tool.GPT3_TASKS) == 19


def test_standard_names_evaluate_offline_from_local_files(tmp_path, tmp_path_factory):
    tool = load_script("tools/make_local_tasks.py")
    data = write_data(tmp_path / "data")
    names = [n.split("/")[0] for n in DOCS]
    assert tool.main(["--data-dir", str(data), "--output-dir", str(tmp_path / "tasks"),
                      "--tasks", ",".join(names)]) == 0
    gpt = load_gpt_checkpoint(fixtures.tiny_setup(tmp_path_factory)["gpt2"])
    results = fixtures.evaluate(MegatronGPTLM(gpt.model, gpt.tokenizer), str(tmp_path / "tasks"), tasks=names)
    assert sorted(results["results"]) == sorted(names)
    assert results["n-samples"]["piqa"]["effective"] == 3
    assert "acc_norm,none" in results["results"]["hellaswag"]  # lm-eval's own metrics and preprocessing
    json.dumps(fixtures.metrics(results))


def test_missing_data_is_a_user_error(tmp_path):
    tool = load_script("tools/make_local_tasks.py")
    (tmp_path / "data").mkdir()
    with pytest.raises(UserError, match="no task had its data"):
        tool.main(["--data-dir", str(tmp_path / "data"), "--output-dir", str(tmp_path / "t"), "--tasks", "piqa"])


def test_few_shot_from_the_evaluated_split_never_shows_a_document_its_own_answer(tmp_path, tmp_path_factory):
    """Without a training split, lm-eval draws few-shot examples from the evaluated documents; each prompt's
    examples must be other documents (lambada_openai evaluates `test`, piqa `validation`)."""
    tool = load_script("tools/make_local_tasks.py")
    words = ["alpha", "bravo", "charlie", "delta", "echo"]
    lam = [{"text": f"the {w} cat sat on the {w}mat"} for w in words]
    piqa = [{"goal": f"open the {w} door", "sol1": "push it", "sol2": "eat it", "label": 0} for w in words]
    for name, rows in (("lambada_openai/test", lam), ("piqa/validation", piqa)):
        (tmp_path / name).parent.mkdir()
        fixtures.write_jsonl(str(tmp_path / name) + ".jsonl", rows)
    written, _ = tool.write_tasks(["lambada_openai", "piqa"], str(tmp_path), str(tmp_path / "tasks"))
    gpt = load_gpt_checkpoint(fixtures.tiny_setup(tmp_path_factory)["gpt2"])
    results = fixtures.evaluate(MegatronGPTLM(gpt.model, gpt.tokenizer), str(tmp_path / "tasks"),
                                tasks=["lambada_openai", "piqa"], num_fewshot=2)
    for sample in results["samples"]["lambada_openai"]:
        context = sample["arguments"][0][0]  # (context, continuation) of the request
        assert context.count("cat sat on the") == 3, context  # two examples and the document itself
        assert sample["doc"]["text"].split()[-1] not in context, context  # ... which is not among the examples
    for sample in results["samples"]["piqa"]:
        context = sample["arguments"][0][0]
        assert context.count("Question: open the") == 3 and context.count(sample["doc"]["goal"]) == 1, context
    cfg = yaml.safe_load(open(written[0]))  # lm-eval leaves the document out when fewshot_split == test_split
    assert cfg["fewshot_split"] == cfg["test_split"] == "test"
