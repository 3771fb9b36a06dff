"""Model FLOPs of a training iteration (Megatron's formula), with random-LTD's shorter layers, and MFU.

Megatron-LM (`num_floating_point_operations` in megatron/training/training.py) counts only the GEMMs:

    F = 12 b s L h^2 [ (1 + G/nh + s/(2h)) q/h  +  (f/h) x (3/2 for SwiGLU)  +  V/(2 L h) ]
                           attention                    MLP                      logits

with q = nh x hd the query projection size. Where it comes from, per layer and token (a GEMM of an m x k
by a k x n matrix costs 2mkn; training runs each GEMM three times: forward, input gradient, weight
gradient):

    QKV projection     2 h (q + 2 G hd)     the queries and one key and one value head per group
    output projection  2 q h
    QK^T and AV        2 x 2 s q / 2        only the causal half of the s x s scores is computed
    MLP                2 h f x 2            fc1 and fc2 (fc1 is 2f wide with SwiGLU: x 3 instead)
    logits             2 h V / L            the LM head, once per token (not per layer)

and 3 x (2h(q + 2G hd) + 2qh) = 12 h q (1 + G/nh), 3 x 2sq = 12 h^2 (s/(2h)) q/h, and so on: the bracket
above. A bidirectional encoder (BERT) computes the whole score matrix, s/h instead of s/(2h).

Random-LTD: a layer of the LTD set sees r tokens per sample instead of s (n = r in the per-layer terms,
its attention r^2 instead of s^2); the other layers, the embeddings and the LM head see all s. The
*actual* FLOPs of an iteration use r_t; the *dense-equivalent* FLOPs are the same iteration's with n = s
everywhere, i.e. what a dense model would have to compute for the same samples: dense-equivalent
TFLOP/s is random-LTD's "speed", actual TFLOP/s how well the smaller shapes use the GPU.

Neither counts recomputed forwards (activation recomputation), the optimizer or the elementwise work:
model FLOPs, as in Megatron and the PaLM definition of MFU. TFLOP/s per GPU divides by the world size.

Glossary: b micro batch (or any number of samples), s sequence, r kept tokens, L layers, h hidden, nh
query heads, G query groups, hd head dimension, f FFN hidden size, V padded vocabulary.
"""

from typing import Iterable, Optional

from megatron.core.transformer.config import TransformerConfig

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched against
# torch.cuda.get_device_name() in order (the first name contained in it wins).
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H100", 989.0), ("H200", 989.0),
    ("H800", 989.0), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("V100", 125.0),
)


def default_peak_tflops(device_name: Optional[str], precision: str) -> Optional[float]:
    """The half-precision peak of a known GPU for a bf16/fp16 run; None otherwise (an fp32 run, a CPU, an
    unknown GPU): then MFU needs --peak-tflops."""
    if device_name is None or precision not in ("bf16", "fp16"):
        return None
    return next((peak for name, peak in PEAK_TFLOPS if name in device_name), None)


def layer_flops(config: TransformerConfig, samples: int, n: int) -> int:
    """Training FLOPs (forward + backward) of one transformer layer on n tokens of each of `samples`."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, 2 * c.num_query_groups * c.head_dim
    projections = 2 * n * c.hidden_size * (q + kv) + 2 * n * q * c.hidden_size
    scores = 2 * 2 * n * n * q // (2 if c.causal else 1)
    mlp = 2 * n * c.hidden_size * c.ffn_hidden_size * (3 if c.swiglu else 2)
    return 3 * samples * (projections + scores + mlp)


def iteration_flops(config: TransformerConfig, samples: int, ltd_layers: Iterable[int] = (),
                    kept_length: Optional[int] = None) -> int:
    """Training FLOPs of one iteration on `samples` samples (the global batch): the layers of `ltd_layers`
    on `kept_length` tokens per sample (None, or >= s: all s), the others and the LM head on s."""
    s, L = config.seq_length, config.num_layers
    n_ltd = len(frozenset(ltd_layers)) if kept_length is not None and kept_length < s else 0
    head = 3 * samples * 2 * s * config.hidden_size * config.vocab_size
    return (L - n_ltd) * layer_flops(config, samples, s) + n_ltd * layer_flops(config, samples, kept_length or s) + head

