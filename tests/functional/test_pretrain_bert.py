"""pretrain_bert_ltd.py end to end: a tiny BERT with random-LTD learns and logs lm/sop loss and MLM
accuracy (token-weighted over micro-batches and ranks); --bert-no-binary-head; one-line errors and
warnings; out-of-vocabulary data refused at start-up; the BERT-large recipes' flags and schedule; and a
run on real preprocessed text that learns."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron.core.datasets.indexed import IndexedDatasetBuilder
from megatron.core.errors import UserError
from megatron.core.models.bert import BertOutput
from tests.functional import bert_cli
from tests.functional.gpt_cli import REPO, read_json_lines


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
    for field in ("lm loss:", "sop loss:", "mlm accuracy:", "sop accuracy:", "kept length:"):
        assert field in line, field
    assert "sop loss value:" in out and "mlm accuracy value:" in out  # the validation block
    train = [r for r in records if "lm_loss" in r]
    assert {"lm_loss", "sop_loss", "mlm_accuracy", "sop_accuracy"} <= set(train[0])
    assert train[0]["kept_length"] == 8 and train[-1]["kept_length"] == 32
    ln_v = math.log(128)  # padded vocabulary
    assert abs(train[0]["lm_loss"] - ln_v) < 0.15 and abs(train[0]["sop_loss"] - math.log(2)) < 0.05
    assert sum(r["lm_loss"] for r in train[-3:]) / 3 < ln_v - 1.3, [r["lm_loss"] for r in train]
    val = [r for r in records if "val_loss" in r][-1]
    assert val["val_loss"] < ln_v - 1.3 and {"val_sop_loss", "val_mlm_accuracy"} <= set(val)
    assert 0.0 <= train[-1]["mlm_accuracy"] <= 1.0


def test_no_binary_head_drops_sop(tmp_path, vocab, monkeypatch, capsys):
    import torch

    bert_cli.use_synthetic_data(monkeypatch)
    records = run(tmp_path, vocab, ["--bert-no-binary-head", "--train-iters", "3", "--save", str(tmp_path / "ck"),
                                        "--ckpt-format", "torch"])
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
    argv = bert_cli.TINY + ["--vocab-file", vocab, "--data-path", "x", "--train-iters", "3"] + flags
    assert bert_cli.run_inprocess(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_a_tokenizer_without_bert_tokens_is_refused(tmp_path):
    from megatron.core.tokenizer.null import NullTokenizer

    with pytest.raises(UserError, match="BertWordPieceLowerCase"):  # before the config is read at all
        bert_cli.load_entry().build_datasets(None, None, NullTokenizer(10), (8, 8, 8))


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
    from megatron.training.config import run_length_from_flags

    ltd = parse_bert_args(recipe_argv("pretrain_bert_large_ltd.sh", tmp_path / "ltd"))
    base = parse_bert_args(recipe_argv("pretrain_bert_large_baseline.sh", tmp_path / "base"))
    for a in (ltd, base):
        assert (a.num_layers, a.hidden_size, a.num_attention_heads, a.seq_length) == (24, 1024, 16, 512)
        assert (a.global_batch_size, a.lr, a.min_lr, a.lr_decay_style, a.lr_warmup_iters) == (
            1024, 1e-4, 1e-5, "linear", 10000)
        assert a.tokenizer_type == "BertWordPieceLowerCase" and a.bert_binary_head
    run = run_length_from_flags(ltd, ltd.global_batch_size)
    assert run.train_iters == 2_000_000 and run.ltd_layers == frozenset(range(1, 23))
    assert run.kept_length(0) == 128 and run.kept_length(1_739_499) == 496 and run.kept_length(1_739_500) == 512
    assert ltd.layer_token_lr_schedule and not base.random_ltd and not base.layer_token_lr_schedule
    dense = 24 * 512  # layer-tokens per sample without dropping
    saving = 1 - run.curve.cumulative(run.train_iters) / (dense * 1024 * run.train_iters)
    assert saving == pytest.approx(0.3114, abs=1e-4)  # the paper's 31.1%
    # LayerToken LR: decays to --min-lr exactly at the run's own layer-token total, not at 69% of it
    cfg = LRScheduleConfig(ltd.lr, ltd.min_lr, "linear", *schedule_lengths(
        global_batch_size=1024, seq_length=512, train_samples=run.decay_default_samples, warmup_iters=10000))
    total = run.curve.cumulative(run.train_iters) / dense  # dense-equivalent samples at the end
    assert lr_at(cfg, total) == pytest.approx(1e-5) and lr_at(cfg, 0.9 * total) > 1e-5
    assert run_length_from_flags(base, base.global_batch_size).train_iters == 2_000_000


def test_real_sentence_data_end_to_end(tmp_path, vocab):
    """Sample corpus -> WordPiece + --split-sentences -> BERT with random-LTD -> checkpoint: the real
    dataset (not the synthetic one) meets the model, and the model learns from it.

    The corpus uses 20 of the vocabulary's words. An untrained model predicts about uniformly over the
    padded vocabulary, lm loss ln 128 = 4.85; one that has learnt only which 20 words occur reaches
    ln 20 = 3.0. Requiring the last three iterations to average a full nat below the first is far outside
    the noise of ~0.1 per iteration (~130 predicted tokens); labels that were noise rather than the text's
    ids at the masked positions could not get there."""
    corpus = tmp_path / "corpus.jsonl"
    words = bert_cli.WORDS[:20]
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
        "--vocab-file", vocab, "--data-path", prefix + "_text_sentence", "--train-iters", "20",
        "--micro-batch-size", "16", "--global-batch-size", "16", "--lr", "5e-3", "--lr-decay-style", "constant",
        "--log-json", str(log), "--save", str(tmp_path / "ck"), "--eval-interval", "10"]
    assert bert_cli.run_inprocess(argv) == 0
    train = [r for r in read_json_lines(log) if "lm_loss" in r]
    assert len(train) == 20 and all(math.isfinite(r["lm_loss"]) and math.isfinite(r["sop_loss"]) for r in train)
    assert train[0]["kept_length"] == 8 and train[-1]["kept_length"] == 32
    losses = [r["lm_loss"] for r in train]
    assert abs(losses[0] - math.log(128)) < 0.2, losses
    assert np.mean(losses[-3:]) < losses[0] - 1.0, losses
    assert (tmp_path / "ck" / "iter_0000020" / ".metadata").is_file()  # torch_dist, the default format


def loss_fn_metrics(correct, predicted):
    """The metrics pretrain_bert_ltd's loss_fn returns for one micro-batch whose rows predict `predicted[i]`
    tokens, the first `correct[i]` of them right (a stand-in model returns the per-token outputs)."""
    entry = bert_cli.load_entry()
    b, s = len(correct), 8
    loss_mask = torch.zeros(b, s)
    mlm_correct = torch.zeros(b, s, dtype=torch.bool)
    for i, (c, n) in enumerate(zip(correct, predicted)):
        loss_mask[i, :n] = 1.0
        mlm_correct[i, :c] = True
        mlm_correct[i, n:] = True  # right by chance where nothing is predicted: must not count
    batch = {"text": torch.zeros(b, s, dtype=torch.long), "types": torch.zeros(b, s, dtype=torch.long),
             "labels": torch.zeros(b, s, dtype=torch.long), "padding_mask": torch.zeros(b, s, dtype=torch.bool),
             "loss_mask": loss_mask, "is_random": torch.zeros(b, dtype=torch.long), "ltd": None}
    out = BertOutput(lm_loss=torch.ones(b, s), mlm_correct=mlm_correct, binary_logits=torch.zeros(b, 2))
    _, loss_fn = entry.forward_step(iter([batch]), lambda *args, **kw: out)
    return loss_fn(out)[1]


def test_mlm_accuracy_is_token_weighted():
    from megatron.training.metrics import mean_metrics as _mean_metrics

    # Micro-batch 1: 3 of 4 predicted tokens right; micro-batch 2: 1 of 1; micro-batch 3: none predicted.
    metrics = [loss_fn_metrics([3], [4]), loss_fn_metrics([1], [1]), loss_fn_metrics([0], [0])]
    got = _mean_metrics(metrics)
    assert got["mlm accuracy"] == pytest.approx(4 / 5)  # per-micro-batch mean would say (0.75 + 1 + 0) / 3
    assert got["lm loss"] == pytest.approx(2 / 3)  # losses stay Megatron's mean over micro-batches (1, 1, 0)
    assert got["sop accuracy"] == pytest.approx(1.0)


def _dp_accuracy(rank, world_size, out_dir):
    from megatron.training.metrics import mean_metrics as _mean_metrics

    mine = [loss_fn_metrics([3, 0], [4, 2])] if rank == 0 else [loss_fn_metrics([1], [6]), loss_fn_metrics([0], [0])]
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(_mean_metrics(mine), f)


def test_mlm_accuracy_is_token_weighted_across_data_parallel_ranks(tmp_path):
    from tests.distributed.launcher import run_distributed

    run_distributed(_dp_accuracy, world_size=2, args=(str(tmp_path),), hang_after_s=120)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"{rank}.json").read_text())
        assert got["mlm accuracy"] == pytest.approx((3 + 0 + 1) / (4 + 2 + 6)), rank  # 4 of 12, on every rank


@pytest.mark.parametrize("layers, warned", [("1-2", None), ("0-2", "layer 0 enters"), ("1-3", "last layer 3")])
def test_ltd_in_first_or_last_layer_warns(tmp_path, vocab, capsys, layers, warned):
    from megatron.training.bert_arguments import parse_bert_args

    argv = bert_cli.TINY + bert_cli.LTD + ["--vocab-file", vocab, "--data-path", "x", "--train-iters", "3",
                                           "--random-ltd-layers", layers]
    parse_bert_args(argv)
    lines = [x for x in capsys.readouterr().out.splitlines() if "WARNING" in x]
    if warned is None:
        assert lines == []
    else:
        assert len(lines) == 1 and lines[0].startswith("WARNING: --random-ltd-layers") and warned in lines[0], lines
        assert "random-LTD keeps dense" in lines[0] and "(the default is 1-2)" in lines[0]


def test_out_of_vocab_data_refused_at_start_up(tmp_path, vocab, capsys):
    """Ids beyond the vocabulary stop the run before any index is built: one line, exit 2, and nothing
    written (no index cache, no token-range cache, no checkpoint folder)."""
    data = tmp_path / "data"
    data.mkdir()
    with IndexedDatasetBuilder(str(data / "bad_text_sentence.bin"), np.uint16) as b:
        for d in range(40):  # sentence-level: 4 sentences per document, one id in the last beyond the vocab
            sentences = [[5 + (d + k) % 100] * 6 for k in range(4)]
            if d == 39:
                sentences[-1][-1] = 300  # vocab.txt has 105 pieces, the tokenizer 107 ids
            b.add_document([t for x in sentences for t in x], [len(x) for x in sentences])
        b.finalize(str(data / "bad_text_sentence.idx"))
    argv = bert_cli.TINY + ["--vocab-file", vocab, "--data-path", str(data / "bad_text_sentence"),
                            "--train-iters", "3", "--save", str(tmp_path / "ck")]
    assert bert_cli.run_inprocess(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: token id 300 in ") and "vocab of 107" in err[0], err
    assert sorted(p.name for p in data.iterdir()) == ["bad_text_sentence.bin", "bad_text_sentence.idx"]
    assert not (tmp_path / "ck").exists()
