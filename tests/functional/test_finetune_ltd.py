"""examples/finetune_gpt2_ltd.sh, shrunk through its knobs: a tiny GPT pretrained on counting patterns
with strides 1-3 is fine-tuned with random-LTD on text of unseen strides (4-6), as the paper fine-tunes
GPT-2 on PTB.

`--finetune` takes the checkpoint's weights and nothing else: the log counts iterations 1..N, the LR warms
up from 0, the MSLG schedule starts at r_0 and reaches s at 80 % of the fine-tuning iterations. The
weights are the checkpoint's: the first fine-tuning loss equals the pretrained model's loss on that batch,
and the validation perplexity before fine-tuning, computed here from the checkpoint (the trainer does not
evaluate at iteration 0), is above the one the script reports after it."""

import math
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.functional.gpt_cli import REPO, TINY, make_pattern_data, read_json_lines, run_inprocess, train_records

VOCAB, SEQ, G, MBS, SEED = 96, 32, 4, 2, 1234  # NullTokenizer ids 0..95, EOD 96
TRAIN_ITERS, EVAL_ITERS, R0, STEP = 20, 4, 8, 4
RAMP = math.ceil(0.8 * TRAIN_ITERS)  # the script's default --random-ltd-ramp-fraction 0.8
TRAIN_LINES, VALID_LINES = 300, 40


def write_strides(path, lines, seed):
    """One document per line: ids counting up with stride 4-6 (mod VOCAB), as whitespace-separated text."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(lines):
            start, stride = rng.randrange(VOCAB), rng.randint(4, 6)
            f.write(" ".join(str((start + i * stride) % VOCAB) for i in range(rng.randint(20, 60))) + "\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finetune_ltd")
    # pretrain briefly on strides 1-3 (no dropout, so the checks below are deterministic)
    tiny = [x for x in TINY if x != "--mock-data"]
    flags = dict(zip(tiny[::2], tiny[1::2]))
    flags.update({"--vocab-size": str(VOCAB), "--lr": "3e-3", "--hidden-dropout": "0", "--attention-dropout": "0",
                  "--eval-iters": "0", "--log-interval": "10", "--train-iters": "30", "--save": str(tmp / "pre")})
    argv = [x for kv in flags.items() for x in kv] + ["--data-path", make_pattern_data(tmp, 300, VOCAB)]
    assert run_inprocess(argv) == 0

    write_strides(tmp / "train.txt", TRAIN_LINES, 1)
    write_strides(tmp / "valid.txt", VALID_LINES, 2)
    env = {**os.environ, "PYTHON": sys.executable, "LAUNCH": sys.executable, "OUT": str(tmp / "ft"),
           "LOAD": str(tmp / "pre"), "TRAIN_DATA": str(tmp / "train.txt"), "VALID_DATA": str(tmp / "valid.txt"),
           "DOC_LINES": "1", "WORKERS": "1", "SEQ": str(SEQ), "GLOBAL_BATCH": str(G), "MICRO_BATCH": str(MBS),
           "LR": "3e-3", "DROPOUT": "0", "LTD_START": str(R0), "LTD_STEP": str(STEP), "TRAIN_ITERS": str(TRAIN_ITERS),
           "LOG_INTERVAL": "1", "EVAL_INTERVAL": "1000", "EVAL_ITERS": str(EVAL_ITERS), "PRECISION": "fp32",
           "DIST_OPT": "0", "EXTRA_ARGS": "--num-workers 0"}
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", "finetune_gpt2_ltd.sh")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, proc.stdout


def test_finetune_starts_a_fresh_run_with_the_mslg_ramp(run):
    tmp, out = run
    # the model and tokenizer flags came from the checkpoint, which the run loaded with --finetune
    for flag, value in (("hidden_size", "32"), ("tokenizer_type", "NullTokenizer"), ("finetune", "True"),
                        ("load", str(tmp / "pre"))):
        assert re.search(rf"^  {flag} \.+ {re.escape(value)}$", out, re.M), flag
    assert re.search(rf"^  split \.+ {TRAIN_LINES},{VALID_LINES},0$", out, re.M)  # the held-out file, exactly
    recs = train_records(tmp / "ft" / "metrics.jsonl")
    assert [r["iteration"] for r in recs] == list(range(1, TRAIN_ITERS + 1))
    assert [r["consumed_samples"] for r in recs] == [G * i for i in range(1, TRAIN_ITERS + 1)]
    lrs = [r["lr"] for r in recs]
    warmup = math.ceil(0.1 * TRAIN_ITERS)  # --lr-warmup-fraction 0.1
    assert lrs[0] == 0.0 and lrs[warmup] == pytest.approx(3e-3) and lrs[-1] < lrs[warmup]
    assert lrs[:warmup + 1] == sorted(lrs[:warmup + 1])
    # MSLG over the fine-tuning iterations: r_t = min(s, q * floor((r0 + t / T * (s - r0)) / q)), t = iteration - 1
    kept = [r["kept_length"] for r in recs]
    assert kept == [min(SEQ, STEP * ((R0 * RAMP + t * (SEQ - R0)) // (RAMP * STEP))) for t in range(TRAIN_ITERS)]
    assert kept[0] == R0 and kept.index(SEQ) == RAMP  # full length from t = 16 = 80 % of 20 iterations
    assert (tmp / "ft" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(TRAIN_ITERS)


def _datasets(tmp, out):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, build_gpt_datasets

    split = re.search(r"^  split \.+ (\S+)$", out, re.M).group(1)
    config = GPTDatasetConfig(seq_length=SEQ, seed=SEED, data_path=[str(tmp / "ft" / "data" / "corpus_text_document")],
                              split=split, eod_token=VOCAB, vocab_size=VOCAB + 1)
    train, valid, _ = build_gpt_datasets(config, (TRAIN_ITERS * G, EVAL_ITERS * G, 0))  # the trainer's counts
    return train, valid


def _model(load):
    from megatron.checkpoint.model_args import build_model_from_args
    from megatron.checkpoint.reader import load_unsharded_checkpoint

    ckpt = load_unsharded_checkpoint(load)
    model = build_model_from_args(ckpt.args, hidden_dropout=0.0, attention_dropout=0.0)
    model.load_state_dict(ckpt.model)
    return model


def _loss(model, dataset, first, ltd=None):
    """The mean per-token loss of the micro-batch of samples [first, first + MBS), as forward_step takes it
    (every token counts: no EOD masking)."""
    batch = {k: torch.from_numpy(np.stack([dataset[i][k] for i in range(first, first + MBS)]))
             for k in ("tokens", "labels", "position_ids")}
    with torch.no_grad():
        return model(batch["tokens"], batch["position_ids"], labels=batch["labels"].long(), ltd=ltd).mean().item()


def test_first_finetune_loss_is_the_pretrained_models(run):
    """Iteration 1 runs the checkpoint's weights, with the LTD layers (1, 2) keeping r_0 tokens per sample."""
    from megatron.core.random_ltd.routing import RandomLTDState

    tmp, out = run
    train, _ = _datasets(tmp, out)
    model = _model(str(tmp / "pre")).train()
    losses = [_loss(model, train, m * MBS, RandomLTDState(SEED, 0, torch.arange(m * MBS, (m + 1) * MBS), R0,
                                                          frozenset({1, 2})))
              for m in range(G // MBS)]
    first = train_records(tmp / "ft" / "metrics.jsonl")[0]["lm_loss"]
    assert first == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    full = sum(_loss(model, train, m * MBS) for m in range(G // MBS)) / (G // MBS)
    assert abs(first - full) > 1e-4  # the tokens really were dropped (r_0 of s) in the middle layers
    assert first < math.log(VOCAB + 1) - 0.05  # and they are trained weights, not a fresh initialization


def test_finetuning_lowers_validation_perplexity(run):
    tmp, out = run
    _, valid = _datasets(tmp, out)

    def valid_loss(load):  # the trainer's validation: --eval-iters global batches, all tokens
        model = _model(load).eval()
        return sum(_loss(model, valid, i) for i in range(0, EVAL_ITERS * G, MBS)) / (EVAL_ITERS * G // MBS)

    vals = [r for r in read_json_lines(tmp / "ft" / "metrics.jsonl") if "val_loss" in r]
    assert [r["iteration"] for r in vals] == [TRAIN_ITERS]
    after = vals[-1]
    assert valid_loss(str(tmp / "ft" / "checkpoints")) == pytest.approx(after["val_loss"], rel=1e-5)  # same samples
    before = valid_loss(str(tmp / "pre"))
    assert after["val_loss"] < before - 0.1, (before, after["val_loss"])
    assert out.rstrip().splitlines()[-1].startswith(f"final validation perplexity: {after['val_ppl']:.3f} ")
