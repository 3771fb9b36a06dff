"""Gather, run, scatter: how one layer runs on its kept tokens only.

This is the one piece of random-LTD the transformer block calls. For a layer in the LTD set, in training,
with r_t < s:

    idx  = ltd.indices_for(layer_number, s)                    # [b, r] sorted, or None: run on all tokens
    part = kept rows of hidden                                 # [b, r, h]
    out  = layer(part, position_ids=pos[idx],                  # RoPE sees each token's ORIGINAL position
                 padding_mask=pad[idx])                        # [b, r]; per sample, no Python loop
    hidden[idx] = out                                          # [b, s, h]; other rows bit-identical

Moving only what must move. The two row copies are one autograd pair (`_GatherKept`, `_ScatterKept`)
that saves nothing but the flat row numbers [b·r] for backward: nothing of [b, s, h] is kept (the
saved-for-backward bytes of an LTD layer are the layer's own on r tokens plus 4·b·r), and backward
builds no full-size zero gradient. The gradient of the layer's input is the incoming gradient of its
output with the kept rows replaced by the gradient that came back through the layer (bypassed rows:
identity; kept rows: overwritten in forward, so only the layer's path counts): `_ScatterKept.backward`
hands the incoming gradient over, `_GatherKept.backward` writes the kept rows into it in place and
returns it. So the incoming gradient of an LTD layer's output is overwritten; autograd's own buffers
(what the next layer, the final norm, a checkpoint or the pipeline's receive produce) are never
reused, and a caller passing its own `grad_outputs` gets them back modified.

The kept rows are written into `hidden` itself when `forward_layer` knows no one else holds it: it is the
tensor the previous layer of the same run returned (`RandomLTDState` remembers it), and not the input
of an activation checkpoint (that one is saved for the rerun). The first layer of a run, a pipeline
stage's input and every direct `run_layer_on_kept` call write into a copy instead (one [b, s, h] copy,
not saved). Rows move in the residual's dtype, with `index_select`/`index_put_` on the flattened
[b·s, h] view: int32 row numbers work as they are, and row copies beat `torch.gather` 4x on the CPU.

Because indices are sorted, "causal among the kept tokens" is exactly causal attention on the gathered
sub-sequence, so a causal layer needs nothing special.

Layer contract: `layer(hidden [b, n, h], position_ids=[b, n] int32/int64 or None, padding_mask=[b, n]
bool or None) -> [b, n, h]`, where padding_mask is True for a padded KEY and position_ids None means
0..n-1. Causal or not is the layer's own business; its output must depend on its input (the residual
does), or the bypassed rows get no gradient.

Under sequence parallelism the block passes this rank's chunk of the sequence and the kept tokens are
routed to the ranks that own their slots in the kept list (`sequence_parallel.py`); the indices are the
same.

Glossary: b micro batch, s sequence, r kept tokens, h hidden, n layers drawn at once.
"""

import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, List, Optional

import torch

from megatron.core import parallel_state as ps
from megatron.core.random_ltd.sampler import kept_indices_for_layers
from megatron.core.random_ltd.sequence_parallel import run_layer_on_kept_sequence_parallel


@dataclass(frozen=True)
class RandomLTDState:
    """What the block needs to drop tokens in one forward pass; the trainer builds one per micro-batch.

    Pass None instead in eval and when LTD is off: the block then runs every layer on all tokens.
    `kept_length` is r_t from the MSLG schedule for this iteration; `sample_ids` [b] each sample's index within
    the global batch (they make the draw independent of the parallel layout and the micro-batch split);
    `layers` the global 0-based layer numbers of the LTD set (the whole set, or just this pipeline stage's
    share: the indices of a layer do not depend on the others).

    The trainer's plan (`plan.py`) hands the indices over already drawn (`preload`, int32 on the device).
    Otherwise the first `indices_for` call draws those of all `layers` at once on sample_ids' device (one
    batch of kernels instead of one per layer). Either way they are kept for the life of this object, so
    activation recomputation reuses them; they would be redrawn identically anyway.
    """

    seed: int
    iteration: int  # completed optimizer steps, 0-based
    sample_ids: torch.Tensor  # [b] int64
    kept_length: int  # r_t
    layers: FrozenSet[int]  # global layer numbers, 0-based
    _drawn: Dict[int, Dict[int, torch.Tensor]] = field(default_factory=dict, init=False, compare=False, repr=False)
    _routes: Dict[int, object] = field(default_factory=dict, init=False, compare=False, repr=False)  # layer -> route
    _last: List = field(default_factory=list, init=False, compare=False, repr=False)  # [weakref] to hidden

    def preload(self, seq_length: int, kept: torch.Tensor, routes: Optional[dict] = None) -> None:
        """Indices drawn ahead: kept [n, b, r] int32 for sorted(layers) at this sequence length, and under
        sequence parallelism each layer's route of kept tokens between the TP ranks ({layer: route})."""
        order = sorted(self.layers)
        assert kept.shape[0] == len(order) and kept.shape[-1] == self.kept_length, "one [b, r] per LTD layer"
        self._drawn[seq_length] = dict(zip(order, kept.unbind(0)))  # layer -> [b, r]
        self._routes.update(routes or {})

    def route_for(self, layer_number: int):
        """The sequence-parallel route the plan prepared for this layer (a KeptTokenRoute), or None."""
        return self._routes.get(layer_number)

    def indices_for(self, layer_number: int, seq_length: int) -> Optional[torch.Tensor]:
        """Sorted kept positions [b, r] int32 for this global layer, or None when it runs on all s tokens."""
        if layer_number not in self.layers or self.kept_length >= seq_length:
            return None
        if seq_length not in self._drawn:
            order = sorted(self.layers)
            idx = kept_indices_for_layers(self.seed, self.iteration, self.sample_ids, order, seq_length,
                                          self.kept_length)  # [n, b, r] int64
            self.preload(seq_length, idx.int())
        return self._drawn[seq_length][layer_number]

    def owns(self, hidden: torch.Tensor) -> bool:
        """True when hidden is what the previous `forward_layer` of this pass returned and nothing saved it:
        the kept rows may then be written into it. Under no_grad (a checkpoint's first run) a tensor that
        requires grad is the checkpoint's saved input, not a layer's output."""
        last = self._last[0]() if self._last else None
        return last is hidden and (torch.is_grad_enabled() or not hidden.requires_grad)

    def returned(self, hidden: torch.Tensor) -> None:
        """Remember the tensor `forward_layer` hands to the next layer."""
        self._last[:] = [weakref.ref(hidden)]


class _GatherKept(torch.autograd.Function):
    """Forward: the kept rows of hidden, [b, s, h] -> [b, r, h], saving only their numbers. Backward: the
    incoming gradient of the routed output (handed over by `_ScatterKept`) with its kept rows replaced by
    this gradient, in place: the whole gradient of the layer's input."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, rows: torch.Tensor, link: dict):  # hidden [b, s, h], rows [b·r]
        ctx.save_for_backward(rows)
        ctx.link = link
        b, _, h = hidden.shape
        return hidden.reshape(-1, h).index_select(0, rows).view(b, -1, h)  # [b, r, h]

    @staticmethod
    def backward(ctx, grad_part: torch.Tensor):  # [b, r, h]
        (rows,) = ctx.saved_tensors
        grad = ctx.link.pop("grad")  # [b, s, h], contiguous
        grad.view(-1, grad.shape[-1]).index_put_((rows,), grad_part.reshape(-1, grad.shape[-1]))
        return grad, None, None


class _ScatterKept(torch.autograd.Function):
    """Forward: out's rows written over the kept rows of hidden (in place when hidden is ours, else into a
    copy), saving only the row numbers. Backward: the kept rows of the incoming gradient go to the layer;
    the incoming gradient itself goes to `_GatherKept`, which completes it (so None here)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, out: torch.Tensor, rows: torch.Tensor, link: dict, inplace: bool):
        ctx.save_for_backward(rows)
        ctx.link = link
        h = hidden.shape[-1]
        target = hidden if inplace else hidden.clone(memory_format=torch.contiguous_format)  # [b, s, h]
        target.view(-1, h).index_put_((rows,), out.reshape(-1, h))
        if inplace:
            ctx.mark_dirty(hidden)
        return target

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # [b, s, h]
        (rows,) = ctx.saved_tensors
        b, _, h = grad.shape
        grad = grad.contiguous()  # written in place by _GatherKept; an expanded one (sum().backward()) is copied
        ctx.link["grad"] = grad
        return None, grad.view(-1, h).index_select(0, rows).view(b, -1, h), None, None, None  # [b, r, h]


def run_layer_on_kept(
    layer: Callable,
    hidden: torch.Tensor,
    idx: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    padding_mask: Optional[torch.Tensor] = None,
    inplace: bool = False,
) -> torch.Tensor:
    """Run `layer` on the tokens idx [b, r] of hidden [b, s, h]; the other tokens pass through unchanged.

    position_ids [b, s] (None: idx itself, the gather of 0..s-1) and padding_mask [b, s] (True = padded
    key) are gathered with the same indices, so kept tokens keep their original positions and their own
    sample's padding. idx may be int32 or int64. With `inplace` the kept rows are written into hidden
    itself (only for a hidden nothing else holds: see the module docstring), else into a copy.
    """
    b, s, h = hidden.shape
    assert idx.dim() == 2 and idx.shape[0] == b, "idx must be [b, r]"
    assert idx.dtype in (torch.int32, torch.long), "idx must be int32 or int64"
    assert b * s < 2 ** 31, "row numbers must fit in int32"
    r = idx.shape[1]
    rows = (idx + torch.arange(0, b * s, s, dtype=idx.dtype, device=idx.device)[:, None]).view(-1)  # [b·r]
    link: dict = {}  # the incoming gradient, from _ScatterKept.backward to _GatherKept.backward
    part = _GatherKept.apply(hidden, rows, link)  # [b, r, h]
    if position_ids is None:
        pos = idx  # [b, r]: the gather of the default positions 0..s-1 is idx itself
    else:
        assert position_ids.shape == (b, s), f"position_ids must be [b, s] = {(b, s)}"
        pos = position_ids.reshape(-1).index_select(0, rows).view(b, r)  # [b, r]
    pad = None
    if padding_mask is not None:
        assert padding_mask.shape == (b, s) and padding_mask.dtype == torch.bool, "padding_mask: [b, s] bool"
        pad = padding_mask.reshape(-1).index_select(0, rows).view(b, r)  # [b, r]
    out = layer(part, position_ids=pos, padding_mask=pad)  # [b, r, h]
    assert out.shape == part.shape and out.dtype == hidden.dtype, "layer must map [b, r, h] to [b, r, h]"
    return _ScatterKept.apply(hidden, out, rows, link, inplace and hidden.is_contiguous())  # [b, s, h]


def forward_layer(
    layer: Callable,
    hidden: torch.Tensor,
    layer_number: int,
    ltd: Optional[RandomLTDState],
    position_ids: Optional[torch.Tensor] = None,
    padding_mask: Optional[torch.Tensor] = None,
    sequence_parallel: bool = False,
) -> torch.Tensor:
    """The block's one call per layer: drop tokens if `ltd` says so for this layer, else run densely.

    Pass ltd=None in eval (the full sequence is always used there). With `sequence_parallel` hidden is
    this TP rank's chunk [b, s/tp, h] and the kept tokens are routed by `sequence_parallel.py`.
    """
    tp = ps.get_tensor_model_parallel_world_size() if sequence_parallel else 1
    s = hidden.shape[1] * tp
    idx = None if ltd is None else ltd.indices_for(layer_number, s)  # [b, r] or None
    if idx is None:
        out = layer(hidden, position_ids=position_ids, padding_mask=padding_mask)  # [b, s, h] or [b, s/tp, h]
    elif tp > 1:
        out = run_layer_on_kept_sequence_parallel(layer, hidden, idx, position_ids, padding_mask,
                                                  ltd.route_for(layer_number))  # [b, s/tp, h]
    else:
        out = run_layer_on_kept(layer, hidden, idx, position_ids, padding_mask, ltd.owns(hidden))  # [b, s, h]
    if ltd is not None:
        ltd.returned(out)
    return out
