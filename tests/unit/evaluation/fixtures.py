"""Tiny, offline evaluation fixtures shared by the evaluation tests: a BPE tokenizer trained on a made-up
corpus, two tiny checkpoints (GPT-2-like and Llama-like) and four local lm-eval tasks.

Everything is built once per pytest process (about 3 s) under a session temp folder. Importing this
module points the Hugging Face libraries at offline mode and a private datasets cache.
"""

import atexit
import json
import os
import random
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "HF_DATASETS_CACHE" not in os.environ:
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="megatron-ltd-hf-datasets-")
    atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], True)

from tests.scripts import load_script  # noqa: E402

WORDS = ("the cat dog bird sat ran on a mat log tree big small red blue green house river under over "
         "and then quickly slowly sun moon star day night").split()
SEQ = 64  # context window of the tiny models: rolling documents below are longer

ARCHS = {
    "gpt2": [],  # learned positions, LayerNorm, GELU, tied output, linear biases
    "llama": ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
              "--untie-embeddings-and-output-weights", "--disable-bias-linear"],
}

_CACHE = {}


def sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n))


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def train_tokenizer(root):
    rng = random.Random(0)
    corpus = write_jsonl(os.path.join(root, "corpus.jsonl"),
                         [{"text": sentence(rng, 30) + "."} for _ in range(200)])
    out = os.path.join(root, "tok")
    assert load_script("tools/train_tokenizer.py").main(
        ["--input", corpus, "--vocab-size", "300", "--type", "gpt2-bpe", "--output-dir", out]) == 0
    return os.path.join(out, "vocab.json"), os.path.join(out, "merges.txt")


def corpus_lines():
    """Text unrelated to the tokenizers' training data: this repository's docs, line by line. Lines naming a
    special token literally (`</s>`) are left out: HF tokenizers read those as the token (a documented
    difference), ours as text."""
    from tests.scripts import REPO

    specials = ("<s>", "</s>", "<unk>", "<|", "<pad>")
    lines = [line for path in sorted((REPO / "docs").glob("*.md"))
             for line in path.read_text(encoding="utf-8").splitlines()
             if line.strip() and not any(s in line for s in specials)]
    return lines[:400] + ["naïve café, 日本語 🙂", "  two  spaces\tand a tab  ", "\ttab first"]


def train_sentencepiece(root):
    """A SentencePiece BPE model trained by tools/train_tokenizer.py on the fixture corpus."""
    rng = random.Random(0)
    corpus = write_jsonl(os.path.join(root, "sp_corpus.jsonl"),
                         [{"text": sentence(rng, 30) + ". Tree 42!"} for _ in range(200)])
    out = os.path.join(root, "sp")
    assert load_script("tools/train_tokenizer.py").main(
        ["--input", corpus, "--vocab-size", "300", "--type", "sentencepiece", "--output-dir", out]) == 0
    return os.path.join(out, "tokenizer.model")


def train_checkpoint(root, arch, tokenizer_flags, name=None):
    from tests.functional.gpt_cli import run_inprocess

    save = os.path.join(root, f"ckpt_{name or arch}")
    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", str(SEQ),
            "--micro-batch-size", "2", "--global-batch-size", "2", "--train-iters", "3", "--lr", "1e-2",
            "--lr-decay-style", "constant", *tokenizer_flags, "--mock-data", "--num-workers", "0",
            "--eval-iters", "0", "--log-interval", "100", "--seed", "3", "--save", save, *ARCHS[arch],
            "--ckpt-format", "torch"]  # files these tests read and damage by name; torch_dist: test_hf_export.py
    assert run_inprocess(argv) == 0
    return save


def write_tasks(root):
    """Four local tasks, one per lm-eval request type; data files referenced by absolute path."""
    rng = random.Random(1)
    d = os.path.join(root, "tasks")
    os.makedirs(d, exist_ok=True)
    mc = [{"question": sentence(rng, 6), "choices": [sentence(rng, 2) for _ in range(3)], "label": i % 3}
          for i in range(6)]
    lam = [{"text": sentence(rng, 8)} for _ in range(6)]
    pages = [{"page": sentence(rng, 90)}, {"page": sentence(rng, 5)}, {"page": sentence(rng, 40)}]
    gen = [{"q": sentence(rng, 5), "a": rng.choice(WORDS)} for _ in range(5)]
    data = {name: write_jsonl(os.path.join(d, f"{name}.jsonl"), rows)
            for name, rows in (("mc", mc), ("lam", lam), ("pages", pages), ("gen", gen))}
    common = "dataset_path: json\ndataset_name: null\ntest_split: test\nmetadata:\n  version: 1.0\n"
    yamls = {
        "tiny_mc": """output_type: multiple_choice
doc_to_text: "Question: {{question}}\\nAnswer:"
doc_to_choice: "{{choices}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
""",
        "tiny_lambada": """output_type: loglikelihood
doc_to_text: "{{text.split(' ')[:-1]|join(' ')}}"
doc_to_target: "{{' '+text.split(' ')[-1]}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
        "tiny_pages": """output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{page}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
""",
        "tiny_gen": """output_type: generate_until
doc_to_text: "Q: {{q}}\\nA:"
doc_to_target: "{{a}}"
generation_kwargs:
  until: ["\\n", "."]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    }
    files = {"tiny_mc": "mc", "tiny_lambada": "lam", "tiny_pages": "pages", "tiny_gen": "gen"}
    for task, body in yamls.items():
        with open(os.path.join(d, f"{task}.yaml"), "w") as f:
            f.write(f"task: {task}\n{common}dataset_kwargs:\n  data_files:\n    test: {data[files[task]]}\n{body}")
    return d


def tiny_setup(tmp_path_factory):
    """{'vocab', 'merges', 'gpt2', 'llama' (checkpoint folders), 'tasks' (task folder), 'root'}, built once."""
    if not _CACHE:
        root = str(tmp_path_factory.mktemp("eval_setup"))
        vocab, merges = train_tokenizer(root)
        flags = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", vocab, "--merge-file", merges]
        _CACHE.update(root=root, vocab=vocab, merges=merges, tasks=write_tasks(root),
                      **{arch: train_checkpoint(root, arch, flags) for arch in ARCHS})
    return _CACHE


def sentencepiece_setup(tmp_path_factory):
    """{'sp_model', 'sp_llama' (a Llama-style checkpoint trained with it)}, built once, on first use."""
    setup = tiny_setup(tmp_path_factory)
    if "sp_llama" not in setup:
        model = train_sentencepiece(setup["root"])
        flags = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", model]
        setup.update(sp_model=model, sp_llama=train_checkpoint(setup["root"], "llama", flags, name="sp_llama"))
    return setup


TASKS = ["tiny_mc", "tiny_lambada", "tiny_pages", "tiny_gen"]


def evaluate(lm, tasks_dir, tasks=TASKS, **kwargs):
    """simple_evaluate on the local tasks only (no default task index), without stderr bootstrap."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=tasks_dir, include_defaults=False)
    return simple_evaluate(model=lm, tasks=list(tasks), task_manager=tm, bootstrap_iters=0, log_samples=True,
                           **kwargs)


def metrics(results):
    """{"task/metric,filter": value} for every metric (stderr left out), flat for pytest.approx."""
    return {f"{t}/{k}": float(v) for t, r in results["results"].items() for k, v in r.items()
            if "," in k and "_stderr" not in k}
