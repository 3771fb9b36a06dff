"""Mixed-precision and distributed-optimizer flags: bad combinations are one `error:` line, exit 2, no
traceback and nothing written; good ones resolve into the run's config as Megatron resolves them."""

import os

import pytest

from tests.functional.gpt_cli import TINY, assert_one_error_line, run_subprocess

DIST = ["--use-distributed-optimizer"]


@pytest.mark.parametrize("flags, needle", [
    (["--overlap-param-gather"], "--overlap-param-gather needs --use-distributed-optimizer"),
    (["--fp16", "--grad-reduce-in-bf16"], "--grad-reduce-in-bf16 needs --bf16 (fp16 gradients"),
    (["--grad-reduce-in-bf16"], "--grad-reduce-in-bf16 needs --bf16"),
    (["--bf16", "--grad-reduce-in-bf16", "--accumulate-allreduce-grads-in-fp32"], "contradict"),
    (["--fp32-residual-connection"], "--fp32-residual-connection needs --bf16 or --fp16"),
    (["--ddp-bucket-size", "0"], "--ddp-bucket-size must be positive"),
], ids=["param-gather-alone", "bf16-reduce-with-fp16", "bf16-reduce-in-fp32", "bf16-reduce-and-fp32",
        "fp32-residual-in-fp32", "zero-bucket"])
def test_bad_precision_flags_one_line_no_traceback(tmp_path, flags, needle):
    proc = run_subprocess(TINY + ["--train-iters", "3", "--save", str(tmp_path / "ck")] + flags)
    assert_one_error_line(proc, needle)
    assert not (tmp_path / "ck").exists()


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


@pytest.mark.parametrize("first, second, needle", [
    ([], DIST, "saved without --use-distributed-optimizer and this run is with it"),
    (DIST, [], "saved with --use-distributed-optimizer and this run is without it"),
], ids=["plain-into-distributed", "distributed-into-plain"])
def test_optimizer_state_of_the_other_kind_is_refused(tmp_path, first, second, needle):
    """In the legacy format, whose optimizer files differ in kind (a torch_dist checkpoint holds the state
    per parameter either way and loads into both: tests/distributed/test_dist_checkpoint.py)."""
    ck = tmp_path / "ck"
    argv = TINY + ["--train-iters", "4", "--save", str(ck), "--ckpt-format", "torch"]
    assert run_subprocess(argv + ["--exit-interval", "2"] + first).returncode == 0
    before = _tree(ck)
    assert any(f.endswith("distrib_optim.pt") for f in before) == bool(first)
    proc = run_subprocess(argv + ["--load", str(ck)] + second)
    assert_one_error_line(proc, needle)
    assert "--no-load-optim" in proc.stderr
    assert _tree(ck) == before  # nothing written


def _config(*flags, world=1):
    from megatron.training.arguments import parse_args
    from megatron.training.config import resolve_config

    return resolve_config(parse_args(TINY + ["--train-iters", "3", *flags]), 97, world_size=world)


def test_precision_flags_resolve_as_megatron_does():
    import torch

    c = _config("--bf16")
    assert c.training.params_dtype == torch.bfloat16 and c.ddp.grad_reduce_in_fp32  # bf16: fp32 grads by default
    assert c.args["accumulate_allreduce_grads_in_fp32"] is True
    assert not _config("--bf16", "--grad-reduce-in-bf16").ddp.grad_reduce_in_fp32
    c = _config("--fp16")
    assert c.training.params_dtype == torch.float16 and not c.ddp.grad_reduce_in_fp32  # Megatron's fp16 default
    assert _config("--fp16", "--accumulate-allreduce-grads-in-fp32").ddp.grad_reduce_in_fp32
    assert _config().training.params_dtype == torch.float32
    assert _config("--bf16", "--fp32-residual-connection").model.fp32_residual_connection
    d = _config(*DIST, "--overlap-grad-reduce", "--overlap-param-gather", "--global-batch-size", "8", world=4).ddp
    assert d.use_distributed_optimizer and d.overlap_grad_reduce and d.overlap_param_gather
    assert d.bucket_size == 40_000_000  # Megatron's max(40M, 1M x dp) with overlap; one bucket without
    assert _config().ddp.bucket_size is None and _config("--ddp-bucket-size", "1000").ddp.bucket_size == 1000
    assert _config(*DIST).optimizer.use_distributed_optimizer
