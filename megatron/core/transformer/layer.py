"""One pre-norm transformer layer: x + drop(attn(norm(x))), then + drop(mlp(norm(.))).

The contract random-LTD relies on: `layer(hidden [b, n, h], position_ids=[b, n], padding_mask=[b, n])`
works for any n and treats the n tokens as an ordered sequence, nothing more. Under sequence parallelism
`hidden` is this rank's chunk `[b, n/tp, h]` of the n tokens (position ids and mask still cover all n),
and the hidden dropouts, which then act on different tokens on each TP rank, draw from the tracker's
per-rank stream.

`--torch-compile` (`config.torch_compile`, a torch.compile backend): the layer's forward is compiled once
for every layer of the model (parameters are graph inputs, so all layers share one graph), which fuses the
norms, bias + dropout + residual and bias + GELU. The token dimension n is marked dynamic before each call,
so random-LTD's kept length r, which MSLG changes every few iterations, and the dense layers' s all run the
same graph instead of recompiling. Whatever swaps RNG states (the tracker's fork, selective
recomputation) runs outside the graph (`torch.compiler.disable`, a graph break; see docs/training.md);
the TP collectives are traced into it. Dropout draws from torch's generators exactly as in eager mode
(inductor's `fallback_random`), so a compiled run draws the same masks, resumes bit for bit, and full
recomputation (which calls the compiled layers) reruns the masks it first drew.
"""

import functools
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron.core.tensor_parallel import get_rng_tracker
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.config import TransformerConfig
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.norm import build_norm


@torch.compiler.disable
def _dropout_add_on_own_stream(residual: torch.Tensor, x: torch.Tensor, p: float) -> torch.Tensor:
    """Sequence parallel: each TP rank holds other tokens, so its hidden dropout draws from its own stream
    (outside any compiled graph: the fork swaps generator states)."""
    with get_rng_tracker().fork():
        return residual + F.dropout(x, p, True)  # [b, n/tp, h]


class TransformerLayer(nn.Module):
    def __init__(self, config: TransformerConfig, layer_number: int):
        super().__init__()
        self.layer_number = layer_number  # global, 0-based: the LTD set is defined on these
        self.hidden_dropout = config.hidden_dropout
        self.sequence_parallel = config.sequence_parallel
        self.compile_backend = config.torch_compile
        self.input_layernorm = build_norm(config)
        self.self_attention = SelfAttention(config)
        self.pre_mlp_layernorm = build_norm(config)
        self.mlp = MLP(config)

    def forward(
        self,
        hidden: torch.Tensor,  # [b, n, h]
        position_ids: Optional[torch.Tensor] = None,  # [b, n]
        padding_mask: Optional[torch.Tensor] = None,  # [b, n]
    ) -> torch.Tensor:
        if self.compile_backend is None:
            return self._forward(hidden, position_ids, padding_mask)  # [b, n, h]
        for t in (hidden, position_ids, padding_mask):
            if t is not None:
                torch._dynamo.maybe_mark_dynamic(t, 1)  # n: r or s, one graph for all
        return _compiled_forward(self.compile_backend)(self, hidden, position_ids, padding_mask)  # [b, n, h]

    def _forward(self, hidden, position_ids, padding_mask):
        p = self.hidden_dropout if self.training else 0.0
        attn = self.self_attention(self.input_layernorm(hidden), position_ids, padding_mask)  # [b, n, h]
        hidden = self._dropout_add(hidden, attn, p)  # [b, n, h]
        mlp = self.mlp(self.pre_mlp_layernorm(hidden))  # [b, n, h]
        return self._dropout_add(hidden, mlp, p)  # [b, n, h]

    def _dropout_add(self, residual: torch.Tensor, x: torch.Tensor, p: float) -> torch.Tensor:
        if self.sequence_parallel and p > 0:
            return _dropout_add_on_own_stream(residual, x, p)  # [b, n/tp, h]
        return residual + F.dropout(x, p, self.training)  # [b, n, h]


@functools.lru_cache(maxsize=None)
def _compiled_forward(backend: str):
    """`TransformerLayer._forward` compiled once per backend and shared by every layer (dynamo guards on
    the module's type and flags, not its identity). Inductor draws random numbers with torch's own
    generators (`fallback_random`), as eager mode does."""
    options = {"fallback_random": True} if backend == "inductor" else None
    return torch.compile(TransformerLayer._forward, backend=backend, options=options)


def compile_stats() -> tuple:
    """(graphs compiled, seconds spent compiling) so far in this process, from dynamo's own counters: its
    tracing and the backend's forward and backward compiles. (0, 0.0) where this torch has none of them."""
    from torch._dynamo.utils import compile_times, counters  # torch-internal; read defensively

    try:
        names, seconds = compile_times(repr="csv", aggregate=True)
        spent = dict(zip(names, map(float, seconds)))
    except Exception:  # noqa: BLE001 - a torch release that changed the private API: report nothing
        spent = {}
    total = spent.get("_compile.compile_inner", 0.0) + spent.get("compile_fx.<locals>.bw_compiler", 0.0)
    return counters["stats"]["unique_graphs"], total
