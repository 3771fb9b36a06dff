"""The FLOP count of an iteration: against torch's own count of the matmuls a real forward and backward
run, against Megatron-LM's closed form, and by hand for random-LTD's shorter layers; the peak table."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megatron.core.models.gpt import GPTModel
from megatron.core.random_ltd import RandomLTDState
from megatron.core.transformer.config import TransformerConfig
from megatron.training.flops import default_peak_tflops, iteration_flops, layer_flops

B, S = 2, 16
LTD = frozenset({1, 2})


def config(**kw):
    return TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=S, vocab_size=64,
                             hidden_dropout=0.0, attention_dropout=0.0, **kw)


def counted(cfg, kept=None):
    """FLOPs torch counts for one forward + backward of a real GPTModel (SDPA's math kernel, so the scores
    are plain matmuls the counter sees; it computes the whole s x s square)."""
    torch.manual_seed(0)
    model = GPTModel(cfg).train()
    tokens = torch.randint(0, cfg.vocab_size, (B, S))
    ltd = None if kept is None else RandomLTDState(seed=1, iteration=0, sample_ids=torch.arange(B),
                                                   kept_length=kept, layers=LTD)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(tokens, labels=tokens, ltd=ltd).mean().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("kw", [{}, dict(swiglu=True, num_query_groups=2)], ids=["gelu-mha", "swiglu-gqa"])
@pytest.mark.parametrize("kept", [None, 8], ids=["dense", "ltd-r8"])
def test_bidirectional_count_equals_torchs_count_of_a_real_step(kw, kept):
    """Without a causal mask every score is computed: our count is exactly what the matmuls ran."""
    cfg = config(causal=False, **kw)
    assert iteration_flops(cfg, B, LTD, kept) == counted(cfg, kept)


def test_causal_attention_counts_half_the_scores():
    causal, full = config(), config(causal=False)
    scores = 3 * B * 2 * 2 * S * S * 32  # QK^T and AV over the whole square, forward + backward
    assert layer_flops(full, B, S) - layer_flops(causal, B, S) == scores // 2


def test_equals_megatrons_closed_form():
    """Megatron-LM's num_floating_point_operations (causal half, GQA and SwiGLU terms), written out."""
    for kw in ({}, dict(swiglu=True, num_query_groups=2)):
        c = config(**kw)
        h, s, L, nh, G, f, V = 32, S, 4, 4, c.num_query_groups, c.ffn_hidden_size, 64
        gated = 3 / 2 if c.swiglu else 1
        megatron = 12 * B * s * L * h * h * ((1 + G / nh + s / h / 2) * 1 + f / h * gated + V / (2 * L * h))
        assert iteration_flops(c, B) == pytest.approx(megatron, rel=1e-12)


def test_random_ltd_by_hand():
    """Layers 1 and 2 on r = 4 tokens, layers 0 and 3 and the LM head on all 16 (h 32, f 128, V 64)."""
    c, r, h, f, V = config(), 4, 32, 128, 64

    def layer(n):  # QKV + proj, causal scores, fc1 + fc2; x 3 for forward and backward
        return 3 * B * (2 * n * h * 3 * h + 2 * n * h * h + 2 * n * n * h + 2 * n * h * f * 2)
    head = 3 * B * 2 * S * h * V
    assert iteration_flops(c, B, LTD, r) == 2 * layer(S) + 2 * layer(r) + head
    assert iteration_flops(c, B, LTD, S) == iteration_flops(c, B) == 4 * layer(S) + head  # r = s: dense
    assert iteration_flops(c, B, (), r) == iteration_flops(c, B)  # no LTD layers


def test_default_peak():
    assert default_peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert default_peak_tflops("NVIDIA H100 80GB HBM3", "fp16") == 989.0
    assert default_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.0
    assert default_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert default_peak_tflops("NVIDIA H200", "fp32") is None  # its peak is another number: give --peak-tflops
    assert default_peak_tflops("Some Future GPU", "bf16") is None
    assert default_peak_tflops(None, "bf16") is None  # CPU
