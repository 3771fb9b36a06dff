"""End-to-end runs of pretrain_gpt_ltd.py on tiny models: learning, logging, exact resume, bad flags."""

import math

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.functional.gpt_cli import (
    TINY,
    make_pattern_data,
    read_json_lines,
    run_inprocess,
    run_subprocess,
    train_records,
)


def tensorboard_scalars(folder) -> dict:
    """{tag: {step: value}} from the one event file in `folder`, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_tiny_run_learns_and_logs(tmp_path, capsys):
    log = tmp_path / "m.jsonl"
    prefix = make_pattern_data(tmp_path)
    argv = [a for a in TINY if a != "--mock-data"] + [
        "--data-path", prefix, "--split", "90,10,0", "--train-iters", "80", "--log-json", str(log),
        "--hidden-dropout", "0.0", "--attention-dropout", "0.0", "--lr", "4e-3",
        "--tensorboard-dir", str(tmp_path / "tb")]
    assert run_inprocess(argv) == 0
    out = capsys.readouterr().out
    assert "iteration       80/      80 | consumed samples:          320 |" in out
    assert "validation loss at iteration 80 on validation set" in out
    assert "kept length" not in out and "layer-token saving" not in out  # dense: Megatron's line
    recs = train_records(log)
    assert [r["iteration"] for r in recs] == list(range(1, 81))
    for key in ("iteration", "consumed_samples", "consumed_tokens", "lr", "lm_loss", "grad_norm",
                "elapsed_ms_per_iteration", "tokens_per_sec"):
        assert key in recs[0]
    assert recs[-1]["consumed_tokens"] == 320 * 32
    assert recs[0]["lr"] == 0.0  # iteration 1 uses the LR at progress 0 (warmup)
    assert recs[1]["lr"] == pytest.approx(2e-3)  # progress 4 of 8 warmup samples
    assert recs[0]["lm_loss"] == pytest.approx(math.log(128), abs=0.3)  # padded vocab 128
    assert recs[-1]["lm_loss"] < recs[0]["lm_loss"] - 1.0  # the counting pattern is learnable
    vals = [r for r in read_json_lines(log) if "val_loss" in r]
    assert vals and all(abs(v["val_ppl"] - math.exp(v["val_loss"])) < 1e-6 * v["val_ppl"] for v in vals)
    # TensorBoard holds the same numbers as the JSON (stored as float32)
    tb = tensorboard_scalars(tmp_path / "tb")
    assert tb["lm loss"] == {r["iteration"]: pytest.approx(r["lm_loss"], rel=1e-6) for r in recs}
    assert tb["learning-rate"] == {r["iteration"]: pytest.approx(r["lr"], rel=1e-6, abs=1e-12) for r in recs}
    assert tb["lm loss validation"] == {v["iteration"]: pytest.approx(v["val_loss"], rel=1e-6) for v in vals}
    assert sorted(tb["lm loss validation"]) == list(range(4, 81, 4))


def megatron_lr(num_steps: int, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Megatron's OptimizerParamScheduler.get_lr for cosine decay, written out (steps are samples)."""
    if warmup_steps > 0 and num_steps <= warmup_steps:
        return max_lr * num_steps / warmup_steps
    if num_steps > decay_steps:
        return min_lr
    ratio = (num_steps - warmup_steps) / (decay_steps - warmup_steps)
    return min_lr + 0.5 * (math.cos(math.pi * ratio) + 1.0) * (max_lr - min_lr)


def test_logged_lr_is_megatron_cosine_at_progress_before_the_step(tmp_path):
    """Iteration k runs at get_lr((k - 1) * G): warmup, cosine and past-decay (min-lr) all visited."""
    log = tmp_path / "m.jsonl"
    G, warmup, decay = 4, 2, 7  # iterations (TINY: G 4, --lr-warmup-iters 2)
    argv = TINY + ["--train-iters", "10", "--lr-decay-iters", str(decay), "--eval-iters", "0",
                   "--log-json", str(log)]
    assert run_inprocess(argv) == 0
    recs = train_records(log)
    assert [r["iteration"] for r in recs] == list(range(1, 11))
    for r in recs:
        want = megatron_lr((r["iteration"] - 1) * G, 1e-3, 1e-4, warmup * G, decay * G)
        assert r["lr"] == pytest.approx(want, rel=1e-12, abs=1e-18), (r["iteration"], r["lr"], want)
    assert recs[-1]["lr"] == 1e-4 and recs[0]["lr"] == 0.0


def test_first_step_at_lr_zero_leaves_every_parameter_unchanged(tmp_path):
    """With warmup, iteration 1 runs at LR 0, so its checkpoint holds exactly the initial weights (built
    here from the same flags and seed), weight decay included."""
    from megatron.core.models.gpt import GPTModel
    from megatron.training.arguments import parse_args
    from megatron.training.config import resolve_config

    argv = TINY + ["--train-iters", "1", "--lr-decay-iters", "10", "--eval-iters", "0", "--weight-decay", "0.1"]
    assert run_inprocess(argv + ["--save", str(tmp_path / "ck"), "--ckpt-format", "torch"]) == 0
    saved = torch.load(tmp_path / "ck" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt",
                       weights_only=True)
    assert saved["optimizer"]["adam"]["state"], "the optimizer did step (Adam moments exist)"
    config = resolve_config(parse_args(argv), 97, world_size=1)
    assert config.model.vocab_size == 128  # the NullTokenizer's 97 ids, padded
    initial = GPTModel(config.model, seed=7).state_dict()
    assert set(saved["model"]) == set(initial)
    for name, tensor in initial.items():
        assert torch.equal(saved["model"][name], tensor), name


@pytest.mark.parametrize("ltd", [False, True])
def test_resume_is_exact(tmp_path, ltd, capsys):
    """N iterations straight == N/2, save, resume, N/2: identical losses (dropout on, LTD mid-ramp)."""
    extra = ["--hidden-dropout", "0.1", "--train-iters", "8", "--save-interval", "4"]
    if ltd:
        extra += ["--random-ltd", "--random-ltd-start-seq-length", "8", "--random-ltd-seq-step", "4",
                  "--random-ltd-ramp-iters", "6"]
    straight, first, second = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    assert run_inprocess(TINY + extra + ["--log-json", str(straight), "--save", str(tmp_path / "ck_a")]) == 0
    assert run_inprocess(TINY + extra + ["--log-json", str(first), "--save", str(tmp_path / "ck_b"),
                                         "--exit-interval", "4"]) == 0
    assert run_inprocess(TINY + extra + ["--log-json", str(second), "--save", str(tmp_path / "ck_b"),
                                         "--load", str(tmp_path / "ck_b")]) == 0
    out = capsys.readouterr().out
    assert ("kept length:" in out) == ltd and ("layer-token saving:" in out) == ltd  # the line's LTD fields
    a = train_records(straight)
    b = train_records(first) + train_records(second)
    assert [r["iteration"] for r in b] == list(range(1, 9))
    keys = ["lm_loss", "lr", "grad_norm", "consumed_samples"] + (["kept_length", "consumed_layer_tokens"] if ltd else [])
    for ra, rb in zip(a, b):
        for k in keys:
            assert ra[k] == rb[k], (ra["iteration"], k, ra[k], rb[k])
    val_a = [r["val_loss"] for r in read_json_lines(straight) if "val_loss" in r]
    val_b = [r["val_loss"] for r in read_json_lines(first) + read_json_lines(second) if "val_loss" in r]
    assert val_a == val_b


@pytest.mark.parametrize("flags, needle", [
    (["--global-batch-size", "5"], "not a multiple of --micro-batch-size"),
    (["--hidden-size", "30"], "not divisible by --num-attention-heads"),
    (["--max-position-embeddings", "16"], "longer than the position table"),
    (["--train-iters", "3", "--no-such-flag"], "unrecognized arguments"),
])
def test_bad_flags_one_line_no_traceback(tmp_path, flags, needle):
    argv = TINY + ["--train-iters", "3"] + flags
    proc = run_subprocess(argv + ["--save", str(tmp_path / "ck")])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "ck").exists()


def _dp_train(rank, world, argv, logs):
    assert run_inprocess(argv + ["--log-json", str(logs[rank])]) == 0


def test_global_batch_defaults_to_micro_batch_times_data_parallel_size(tmp_path):
    """Megatron's default --global-batch-size is micro batch x DP size: 2 x 2 on two ranks, 2 on one."""
    i = TINY.index("--global-batch-size")
    argv = TINY[:i] + TINY[i + 2:] + ["--train-iters", "3", "--eval-iters", "0"]
    logs = [tmp_path / "dp0.jsonl", tmp_path / "dp1.jsonl"]
    run_distributed(_dp_train, world_size=2, args=(argv, logs))
    recs = train_records(logs[0])  # rank 0 logs
    assert [r["global_batch_size"] for r in recs] == [4, 4, 4] and recs[-1]["consumed_samples"] == 12
    assert run_inprocess(argv + ["--log-json", str(tmp_path / "one.jsonl")]) == 0
    assert [r["global_batch_size"] for r in train_records(tmp_path / "one.jsonl")] == [2, 2, 2]
