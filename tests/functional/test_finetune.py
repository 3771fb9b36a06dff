"""Fine-tuning judges a BERT checkpoint: GLUE TSV layouts, pair encoding, loading the pretrained encoder
(also from a tensor/pipeline-parallel checkpoint, see tests/distributed/test_bert_equivalence.py), tiny
synthetic MNLI/QQP tasks learnt well above chance, and validation files that share a name kept apart.

In the synthetic tasks the label follows the topic of ONE column (MNLI's hypothesis, QQP's first
question) and the other column is noise, so learning them also shows the columns are read as named.
(A label that needs comparing both segments takes a tiny model far longer than a fast test allows.)"""

import json
import random

import numpy as np
import pytest

from megatron.core.errors import UserError
from megatron.core.tokenizer import TokenizerConfig, build_tokenizer
from tests.functional import bert_cli
from tests.scripts import load_script

MNLI_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
               "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
QQP_HEADER = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]


def sentence(rng, topic, n=None):
    words = bert_cli.WORDS[10 * topic:10 * topic + 10]
    return " ".join(rng.choice(words) for _ in range(n or rng.randint(3, 7)))


def write_mnli(path, n, seed):
    """The label is the topic group of the hypothesis (0-2 entailment, 3-5 contradiction, 6-9 neutral); the
    premise is on a random topic."""
    rng = random.Random(seed)
    group = ["entailment"] * 3 + ["contradiction"] * 3 + ["neutral"] * 4
    with open(path, "w") as f:
        f.write("\t".join(MNLI_HEADER) + "\n")
        for i in range(n):
            t = rng.randrange(10)
            a, b, label = sentence(rng, rng.randrange(10)), sentence(rng, t), group[t]
            f.write("\t".join([str(i), "0", "0", "fiction", "( x )", "( y )", "(ROOT x)", "(ROOT y)", a, b, label,
                               label]) + "\n")


def write_qqp(path, n, seed, broken=0):
    """Duplicate when the first question's topic is 0-4; the second question is on a random topic."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        f.write("\t".join(QQP_HEADER) + "\n")
        for i in range(n):
            t = rng.randrange(10)
            f.write("\t".join([str(i), "1", "2", sentence(rng, t), sentence(rng, rng.randrange(10)), str(int(t < 5))]))
            f.write("\n")
        for i in range(broken):  # QQP's train file has a few lines with missing fields
            f.write(f"{n + i}\t1\tquestion without a pair\n")


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny BERT pretrained briefly on the synthetic topic data (same vocab, same topics)."""
    tmp = tmp_path_factory.mktemp("bert")
    vocab = bert_cli.write_vocab(tmp)
    mp = pytest.MonkeyPatch()
    try:
        bert_cli.use_synthetic_data(mp)
        argv = bert_cli.TINY + bert_cli.LTD + ["--vocab-file", vocab, "--data-path", "unused", "--train-iters", "60",
                                               "--lr", "5e-3", "--eval-iters", "0", "--log-interval", "20",
                                               "--save", str(tmp / "ckpt")]
        assert bert_cli.run_inprocess(argv) == 0
    finally:
        mp.undo()
    return tmp, vocab


def test_glue_readers_and_pair_encoding(tmp_path):
    from tasks.glue import PairDataset, read_pairs

    write_qqp(tmp_path / "qqp.tsv", 6, 0, broken=2)
    pairs, skipped = read_pairs(str(tmp_path / "qqp.tsv"), "QQP")
    assert len(pairs) == 6 and skipped == 2
    rows = [line.split("\t") for line in (tmp_path / "qqp.tsv").read_text().splitlines()[1:7]]
    assert pairs == [(r[3], r[4], int(r[5])) for r in rows]
    write_mnli(tmp_path / "mnli.tsv", 9, 0)
    pairs, _ = read_pairs(str(tmp_path / "mnli.tsv"), "MNLI")
    rows = [line.split("\t") for line in (tmp_path / "mnli.tsv").read_text().splitlines()[1:]]
    classes = {"contradiction": 0, "entailment": 1, "neutral": 2}  # Megatron's order
    assert pairs == [(r[8], r[9], classes[r[11]]) for r in rows]
    tok = build_tokenizer(TokenizerConfig("BertWordPieceLowerCase", vocab_file=bert_cli.write_vocab(tmp_path)))
    data = PairDataset([("ba be bi bo bu", "ca ce ci", 1)], tok, 8)
    b = data.batch(np.array([0]))
    cls, sep = tok.cls, tok.sep
    # budget 5 = 8 - 3: the longer segment loses tokens first -> a = 3 pieces, b = 2
    assert b["text"][0].tolist() == [cls, *tok.tokenize("ba be bi"), sep, *tok.tokenize("ca ce"), sep]
    assert b["types"][0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    assert not b["padding_mask"].any() and b["label"].tolist() == [1]
    short = PairDataset([("ba", "ca", 0)], tok, 8).batch(np.array([0]))
    assert short["padding_mask"][0].tolist() == [False] * 5 + [True] * 3
    assert short["text"][0, 5:].tolist() == [tok.pad] * 3
    with pytest.raises(UserError, match="no column sentence1, sentence2, gold_label"):
        read_pairs(str(tmp_path / "qqp.tsv"), "MNLI")


@pytest.mark.parametrize("task, chance", [("MNLI", 1 / 3), ("QQP", 1 / 2)])
def test_finetune_beats_chance(pretrained, tmp_path, task, chance, capsys):
    tmp, _ = pretrained
    write = write_mnli if task == "MNLI" else write_qqp
    write(tmp_path / "train.tsv", 600, 1)
    write(tmp_path / "dev.tsv", 150, 2)
    log = tmp_path / "ft.jsonl"
    finetune = load_script("tasks/finetune_pair.py")
    argv = ["--task", task, "--pretrained-checkpoint", str(tmp / "ckpt"), "--train-data", str(tmp_path / "train.tsv"),
            "--valid-data", str(tmp_path / "dev.tsv"), "--epochs", "3", "--micro-batch-size", "16",
            "--lr", "2e-3", "--seq-length", "24", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--log-interval", "20", "--log-json", str(log)]
    from megatron.training.cli import run_cli

    assert run_cli(finetune.main, argv) == 0
    out = capsys.readouterr().out
    assert f"final accuracy ({task}): dev.tsv" in out and "fresh: classification head" in out
    records = [json.loads(line) for line in open(log)]
    accs = [r["accuracy"] for r in records if "accuracy" in r]
    assert len(accs) == 3, "one evaluation per epoch"
    assert accs[-1] > chance + 0.25, (task, accs)


def test_finetune_refuses_a_gpt_checkpoint_and_test_files(pretrained, tmp_path):
    from megatron.training.cli import run_cli
    from tests.functional.gpt_cli import TINY

    gpt = tmp_path / "gpt"
    assert run_cli(load_script("pretrain_gpt_ltd.py").main, TINY + ["--train-iters", "3", "--save", str(gpt)]) == 0
    finetune = load_script("tasks/finetune_pair.py")
    write_qqp(tmp_path / "train.tsv", 20, 0)
    argv = ["--task", "QQP", "--train-data", str(tmp_path / "train.tsv"), "--valid-data", str(tmp_path / "train.tsv")]
    with pytest.raises(UserError, match="not a BERT checkpoint"):
        finetune.main(argv + ["--pretrained-checkpoint", str(gpt)])
    (tmp_path / "test.tsv").write_text("id\tquestion1\tquestion2\n0\tba\tbe\n")  # GLUE test files have no labels
    with pytest.raises(UserError, match="no column is_duplicate"):
        finetune.main(["--task", "QQP", "--train-data", str(tmp_path / "test.tsv"), "--valid-data",
                       str(tmp_path / "train.tsv"), "--pretrained-checkpoint", str(pretrained[0] / "ckpt")])


def test_valid_files_with_the_same_name_are_kept_apart(pretrained, tmp_path):
    """a/dev.tsv and b/dev.tsv hold the same pairs with opposite labels: each is reported under its own
    path and their accuracies add up to exactly 1 (one file's hits are the other's misses)."""
    from megatron.training.cli import run_cli

    tmp, _ = pretrained
    write_qqp(tmp_path / "train.tsv", 32, 1)
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    write_qqp(tmp_path / "a" / "dev.tsv", 40, 2)
    rows = (tmp_path / "a" / "dev.tsv").read_text().splitlines()
    flipped = [rows[0]] + ["\t".join(r.split("\t")[:5] + [str(1 - int(r.split("\t")[5]))]) for r in rows[1:]]
    (tmp_path / "b" / "dev.tsv").write_text("\n".join(flipped) + "\n")
    log = tmp_path / "ft.jsonl"
    a, b = str(tmp_path / "a" / "dev.tsv"), str(tmp_path / "b" / "dev.tsv")
    argv = ["--task", "QQP", "--pretrained-checkpoint", str(tmp / "ckpt"), "--train-data", str(tmp_path / "train.tsv"),
            "--epochs", "1", "--micro-batch-size", "16", "--seq-length", "24", "--log-interval", "1",
            "--log-json", str(log)]
    finetune = load_script("tasks/finetune_pair.py")
    assert run_cli(finetune.main, argv + ["--valid-data", a, b]) == 0
    accs = {r["valid"]: r["accuracy"] for r in map(json.loads, open(log)) if "accuracy" in r}
    assert set(accs) == {a, b} and accs[a] + accs[b] == pytest.approx(1.0), accs
    with pytest.raises(UserError, match=r"--valid-data names .*a/dev.tsv twice; give each file once"):
        finetune.main(argv + ["--valid-data", a, str(tmp_path / "a" / ".." / "a" / "dev.tsv")])
