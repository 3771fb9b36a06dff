"""pretrain_bert_ltd.py end to end: a tiny BERT with random-LTD learns and logs lm/sop loss and MLM
accuracy; --bert-no-binary-head; one-line errors; the BERT-large recipes' flags and schedule; and, once
the sentence-level BERT dataset exists, a run on real preprocessed text."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from megatron.core.errors import UserError
from tests.functional import bert_cli
from tests.functional.gpt_cli import REPO, read_json_lines

HAVE_BERT_DATA = importlib.util.find_spec("megatron.core.datasets.bert_dataset") is not None


@pytest.fixture
def vocab(tmp_path):
    return bert_cli.write_vocab(tmp_path)


def run(tmp_path, vocab, extra, name="m"):
    log = tmp_path / f"{name}.jsonl"
    argv = bert_cli.TINY + ["--vocab-file", vocab, "--data-path", "synthetic", "--log-json", str(log)] + extra
    assert bert_cli.run_inprocess(argv) == 0
    return read_json_lines(log)


def test_tiny_bert_with_ltd_learns_and_logs(tmp_path, vocab, monkeypatch, capsys):
    bert_cli.use_synthetic_data(monkeypatch)
    records = run(tmp_path, vocab, bert_cli.LTD + [
        "--train-iters", "300", "--num-attention-heads", "2", "--micro-batch-size", "16", "--global-batch-size", "16",
        "--lr", "5e-3", "--lr-decay-style", "constant", "--random-ltd-ramp-iters", "100", "--log-interval", "10",
        "--eval-interval", "300", "--eval-iters", "2"])
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if "iteration      300/     300" in x)
    for field in ("lm loss:", "sop loss:", "mlm accuracy:", "sop accuracy:", "ltd seq length:"):
        assert field in line, field
    assert "sop loss value:" in out and "mlm accuracy value:" in out  # the validation block
    train = [r for r in records if "lm_loss" in r]
    assert {"lm_loss", "sop_loss", "mlm_accuracy", "sop_accuracy"} <= set(train[0])
    assert train[0]["ltd_seq_length"] == 8 and train[-1]["ltd_seq_length"] == 32
    ln_v = math.log(128)  # padded vocabulary
    assert abs(train[0]["lm_loss"] - ln_v) < 0.15 and abs(train[0]["sop_loss"] - math.log(2)) < 0.05
    assert sum(r["lm_loss"] for r in train[-3:]) / 3 < ln_v - 1.3, [r["lm_loss"] for r in train]
    val = [r for r in records if "val_loss" in r][-1]
    assert val["val_loss"] < ln_v - 1.3 and {"val_sop_loss", "val_mlm_accuracy"} <= set(val)
    assert 0.0 <= train[-1]["mlm_accuracy"] <= 1.0


def test_no_binary_head_drops_sop(tmp_path, vocab, monkeypatch, capsys):
    import torch

    bert_cli.use_synthetic_data(monkeypatch)
    records = run(tmp_path, vocab, ["--bert-no-binary-head", "--train-iters", "3", "--save", str(tmp_path / "ck")])
    train = [r for r in records if "lm_loss" in r]
    assert "sop_loss" not in train[0] and "mlm_accuracy" in train[0]
    assert "sop loss" not in capsys.readouterr().out
    ckpt = torch.load(tmp_path / "ck" / "iter_0000003" / "mp_rank_00" / "model_optim_rng.pt", weights_only=True)
    model = ckpt["model"]
    assert not any(k.startswith(("binary_head", "pooler", "embedding.tokentype")) for k in model)
    assert "lm_head.dense.weight" in model and "output_layer.bias" in model
    assert ckpt["args"]["model_type"] == "bert" and ckpt["args"]["bert_binary_head"] is False


@pytest.mark.parametrize("flags, needle", [
    (["--mock-data"], "--mock-data is GPT-only"),
    (["--mask-prob", "1.5"], "--mask-prob must be in (0, 1)"),
    (["--eod-mask-loss"], "GPT-only flags"),
])
def test_bad_flags_one_line(tmp_path, vocab, capsys, flags, needle):
    argv = bert_cli.TINY + ["--vocab-file", vocab, "--data-path", "x", "--train-iters", "2"] + flags
    assert bert_cli.run_inprocess(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_a_tokenizer_without_bert_tokens_is_refused(tmp_path):
    args = type("A", (), {"tokenizer_type": "NullTokenizer"})()
    from megatron.core.tokenizer.null import NullTokenizer

    with pytest.raises(UserError, match="BertWordPieceLowerCase"):
        bert_cli.load_entry().build_datasets(args, NullTokenizer(10), (8, 8, 8))


def recipe_argv(script, out):
    full = {**os.environ, "LAUNCH": "echo", "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", script)], env=full, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert words[0] == "pretrain_bert_ltd.py"
    return words[1:]


def test_bert_large_recipes_follow_the_paper(tmp_path):
    """LAUNCH=echo prints the command the recipe would launch; its flags give the paper's run."""
    from megatron.training.bert_arguments import parse_bert_args
    from megatron.training.lr_schedule import LRScheduleConfig, lr_at, schedule_lengths
    from megatron.training.run_length import resolve_run_length

    ltd = parse_bert_args(recipe_argv("pretrain_bert_large_ltd.sh", tmp_path / "ltd"))
    base = parse_bert_args(recipe_argv("pretrain_bert_large_baseline.sh", tmp_path / "base"))
    for a in (ltd, base):
        assert (a.num_layers, a.hidden_size, a.num_attention_heads, a.seq_length) == (24, 1024, 16, 512)
        assert (a.global_batch_size, a.lr, a.min_lr, a.lr_decay_style, a.lr_warmup_iters) == (
            1024, 1e-4, 1e-5, "linear", 10000)
        assert a.tokenizer_type == "BertWordPieceLowerCase" and a.bert_binary_head
    run = resolve_run_length(ltd, 24)
    assert run.train_iters == 2_000_000 and run.ltd_layers == frozenset(range(1, 23))
    assert run.keep_at(0) == 128 and run.keep_at(1_739_499) == 496 and run.keep_at(1_739_500) == 512
    assert ltd.layer_token_lr_schedule and not base.random_ltd and not base.layer_token_lr_schedule
    dense = 24 * 512  # layer-tokens per sample without dropping
    saving = 1 - run.curve.cumulative(run.train_iters) / (dense * 1024 * run.train_iters)
    assert saving == pytest.approx(0.3114, abs=1e-4)  # the paper's 31.1%
    # LayerToken LR: decays to --min-lr exactly at the run's own layer-token total, not at 69% of it
    cfg = LRScheduleConfig(ltd.lr, ltd.min_lr, "linear", *schedule_lengths(
        global_batch_size=1024, seq_length=512, train_samples=run.decay_default_samples, warmup_iters=10000))
    total = run.curve.cumulative(run.train_iters) / dense  # dense-equivalent samples at the end
    assert lr_at(cfg, total) == pytest.approx(1e-5) and lr_at(cfg, 0.9 * total) > 1e-5
    assert resolve_run_length(base, 24).train_iters == 2_000_000


@pytest.mark.skipif(not HAVE_BERT_DATA, reason="waits for megatron/core/datasets/bert_dataset.py")
def test_real_sentence_data_end_to_end(tmp_path, vocab):
    """Sample corpus -> WordPiece + --split-sentences -> BERT with random-LTD -> checkpoint: the dataset
    contract (dict of text/types/labels/loss_mask/padding_mask/is_random) meets the model."""
    corpus = tmp_path / "corpus.jsonl"
    words = bert_cli.WORDS
    with open(corpus, "w") as f:
        for d in range(60):
            sentences = [" ".join(words[(d * 7 + s * 3 + w) % len(words)] for w in range(5 + s % 4)) + "."
                         for s in range(6)]
            f.write(json.dumps({"text": " ".join(sentences)}) + "\n")
    prefix = str(tmp_path / "corpus")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "preprocess_data.py"), "--input", str(corpus),
                           "--output-prefix", prefix, "--tokenizer-type", "BertWordPieceLowerCase", "--vocab-file",
                           vocab, "--split-sentences", "--workers", "1", "--no-progress-bar"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = tmp_path / "m.jsonl"
    argv = bert_cli.TINY + bert_cli.LTD + [
        "--vocab-file", vocab, "--data-path", prefix + "_text_sentence", "--train-iters", "12",
        "--log-json", str(log), "--save", str(tmp_path / "ck"), "--eval-interval", "6"]
    assert bert_cli.run_inprocess(argv) == 0
    train = [r for r in read_json_lines(log) if "lm_loss" in r]
    assert len(train) == 12 and all(math.isfinite(r["lm_loss"]) and math.isfinite(r["sop_loss"]) for r in train)
    assert train[0]["ltd_seq_length"] == 8 and train[-1]["ltd_seq_length"] == 32
