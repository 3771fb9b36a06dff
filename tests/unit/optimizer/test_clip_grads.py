"""Clipping, the inf/NaN verdict and the optimizer step queued on the device: the same numbers as the host
computation they replaced, bit for bit on the CPU, and not one value read back on the host."""

import contextlib
import math

import pytest
import torch

from megatron.core.distributed import DataParallelGradSync
from megatron.core.models.gpt import GPTModel
from megatron.core.optimizer.clip_grads import any_rank_found_inf, clip_grads_by_norm, grad_sum_of_squares
from megatron.core.optimizer.optimizer import Optimizer, OptimizerConfig
from megatron.core.transformer.config import TransformerConfig

HOST_READS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@contextlib.contextmanager
def no_host_reads():
    """Every way a tensor's value reaches Python raises inside this block (on CUDA each is a sync)."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def refuse(name):
        def read(self, *args, **kwargs):
            raise AssertionError(f"Tensor.{name} read a value on the host")
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def old_clip_grad_norm(params, max_norm):
    """The clipping before issue 15, kept as the reference: a float() between backward and the step."""
    sq = torch.zeros(())
    for g in (p.grad for p in params if p.grad is not None):
        sq += g.detach().float().pow(2).sum()
    norm = math.sqrt(float(sq))
    if max_norm > 0 and math.isfinite(norm):
        coeff = max_norm / (norm + 1e-6)
        if coeff < 1.0:
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], coeff)
    return norm


def params_with_grads(scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7,), (64, 33), (1000,), (3, 5, 11)]
    out = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.zeros(shape))
        p.grad = torch.randn(shape, generator=g) * scale
        out.append(p)
    return out


@pytest.mark.parametrize("scale, max_norm", [(0.01, 1.0), (1.0, 1.0), (3.0, 0.5), (1.0, 0.0), (1e-8, 1.0)])
def test_clip_equals_the_host_computation_bit_for_bit(scale, max_norm):
    new, old = params_with_grads(scale), params_with_grads(scale)
    with no_host_reads():
        sq = clip_grads_by_norm(new, max_norm)  # [] fp32
    assert math.sqrt(sq.item()) == old_clip_grad_norm(old, max_norm)
    for a, b in zip(new, old):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_norm_leaves_gradients_alone(bad):
    params = params_with_grads(1.0)
    params[2].grad[5] = bad
    before = [p.grad.clone() for p in params]
    sq = clip_grads_by_norm(params, 1.0)
    assert not math.isfinite(sq.item())
    for p, b in zip(params, before):
        assert torch.equal(p.grad.nan_to_num(), b.nan_to_num())


def test_foreach_norm_agrees_with_per_tensor_sums():
    """The CUDA path (torch._foreach_norm), forced on the CPU: equal up to summation order."""
    params = params_with_grads(0.3)
    torch.testing.assert_close(grad_sum_of_squares(params, foreach=True), grad_sum_of_squares(params, foreach=False),
                               rtol=1e-6, atol=0)


def test_verdict_and_unscale_in_one_kernel():
    grads = [torch.randn(10) * 1024, torch.randn(5) * 1024]
    want = [g * (1.0 / 1024) for g in grads]  # the old `_foreach_mul_(grads, 1 / scale)`
    with no_host_reads():
        found = any_rank_found_inf(grads, unscale=1.0 / 1024)
    assert found.dtype == torch.float32 and found.item() == 0.0
    assert all(torch.equal(g, w) for g, w in zip(grads, want))
    grads[1][2] = float("nan")
    assert any_rank_found_inf(grads).item() == 1.0, "exactly 1.0: what fused Adam compares with"


def _optimizer(**kwargs):
    torch.manual_seed(0)
    cfg = TransformerConfig(num_layers=2, hidden_size=16, num_attention_heads=2, seq_length=8, vocab_size=32)
    model = GPTModel(cfg)
    sync = DataParallelGradSync(model.parameters())
    return model, Optimizer(model, OptimizerConfig(lr=1e-2, clip_grad=1.0, **kwargs), sync)


def _fill_grads(model, seed, bad=None):
    g = torch.Generator().manual_seed(seed)
    for i, p in enumerate(model.parameters()):
        p.main_grad.copy_(torch.randn(p.shape, generator=g))
        if bad is not None and i == 3:
            p.main_grad.view(-1)[0] = bad


@pytest.mark.parametrize("kwargs", [dict(check_for_nan=True), dict(fp16=True, initial_loss_scale=8.0, hysteresis=1)],
                         ids=["fp32-check-for-nan", "fp16-scaler"])
def test_a_step_that_must_not_apply_is_skipped_on_the_device(kwargs):
    """launch_step reads nothing; an inf gradient leaves weights, Adam moments and step count exactly as
    they were (fused AdamW's found_inf); finish_step then reports the skip (and halves the fp16 scale)."""
    model, opt = _optimizer(**kwargs)
    _fill_grads(model, 1)
    opt.step()  # a clean step first, so there are moments to keep
    state = {k: v.clone() for k, v in opt.adam.state[opt.mains[0].main].items()}
    weights = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    _fill_grads(model, 2, bad=float("inf"))
    with no_host_reads():
        pending = opt.launch_step()
    result = opt.finish_step(*pending.values().tolist())
    assert result.skipped and (result.nonfinite or opt.loss_scale == 4.0), result
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    assert all(torch.equal(opt.adam.state[opt.mains[0].main][k], v) for k, v in state.items())
    opt.zero_grad()
    _fill_grads(model, 3)
    assert not opt.step().skipped
    assert opt.adam.state[opt.mains[0].main]["step"].item() == 2.0, "the skipped step was not counted"
