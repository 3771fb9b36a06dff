"""Gather, run, scatter: how one layer runs on its kept tokens only.

This is the one piece of random-LTD the transformer block calls. For a layer in the LTD set, in training,
with r_t < s:

    idx  = ltd.indices_for(layer_number, s)                    # [b, r] sorted, or None: run on all tokens
    part = gather(hidden, idx)                                 # [b, r, h]
    out  = layer(part, position_ids=gather(pos, idx),          # RoPE sees each token's ORIGINAL position
                 padding_mask=gather(pad, idx))                # [b, r]; per sample, no Python loop
    hidden = scatter(copy of hidden, idx, out)                 # [b, s, h]; other rows bit-identical

`Tensor.scatter` (out of place) makes autograd do the right thing for free: bypassed rows get the
identity gradient, kept rows get the gradient through the layer, and no extra copy of the activation is
saved for backward. Because indices are sorted, "causal among the kept tokens" is exactly causal attention
on the gathered sub-sequence, so a causal layer needs nothing special.

Layer contract: `layer(hidden [b, n, h], position_ids=[b, n] long or None, padding_mask=[b, n] bool or
None) -> [b, n, h]`, where padding_mask is True for a padded KEY and position_ids None means 0..n-1.
Causal or not is the layer's own business.

Under sequence parallelism the block passes this rank's chunk of the sequence and the kept tokens are
routed to the ranks that own their slots in the kept list (`sequence_parallel.py`); the indices are the
same.

Glossary: b micro batch, s sequence, r kept tokens, h hidden.
"""

from dataclasses import dataclass, field
from typing import Callable, Dict, FrozenSet, Optional

import torch

from megatron.core import parallel_state as ps
from megatron.core.random_ltd.sampler import kept_indices_for_layers
from megatron.core.random_ltd.sequence_parallel import run_layer_on_kept_sequence_parallel


@dataclass(frozen=True)
class RandomLTDState:
    """What the block needs to drop tokens in one forward pass; the trainer builds one per micro-batch.

    Pass None instead in eval and when LTD is off: the block then runs every layer on all tokens.
    `kept_length` is r_t from the MSLG schedule for this iteration; `sample_ids` [b] each sample's index within
    the global batch, on the activations' device (they make the draw independent of the parallel layout
    and the micro-batch split); `layers` the global 0-based layer numbers of the LTD set (the whole set,
    or just this pipeline stage's share: the indices of a layer do not depend on the others).

    The first `indices_for` call draws the indices of all `layers` at once (one batch of kernels instead
    of one per layer) and keeps them for the life of this object, so activation recomputation reuses them;
    they would be redrawn identically anyway.
    """

    seed: int
    iteration: int  # completed optimizer steps, 0-based
    sample_ids: torch.Tensor  # [b] int64
    kept_length: int  # r_t
    layers: FrozenSet[int]  # global layer numbers, 0-based
    _drawn: Dict[int, Dict[int, torch.Tensor]] = field(default_factory=dict, init=False, compare=False, repr=False)

    def indices_for(self, layer_number: int, seq_length: int) -> Optional[torch.Tensor]:
        """Sorted kept positions [b, r] for this global layer, or None when it runs on all s tokens."""
        if layer_number not in self.layers or self.kept_length >= seq_length:
            return None
        if seq_length not in self._drawn:
            order = sorted(self.layers)
            idx = kept_indices_for_layers(self.seed, self.iteration, self.sample_ids, order, seq_length, self.kept_length)
            self._drawn[seq_length] = dict(zip(order, idx.unbind(0)))  # layer -> [b, r]
        return self._drawn[seq_length][layer_number]


def run_layer_on_kept(
    layer: Callable,
    hidden: torch.Tensor,
    idx: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    padding_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run `layer` on the tokens idx [b, r] of hidden [b, s, h]; the other tokens pass through unchanged.

    position_ids [b, s] (None: 0..s-1) and padding_mask [b, s] (True = padded key) are gathered with the
    same indices, so kept tokens keep their original positions and their own sample's padding.
    """
    b, s, h = hidden.shape
    assert idx.dim() == 2 and idx.shape[0] == b and idx.dtype == torch.long, "idx must be [b, r] int64"
    rows = idx.unsqueeze(-1).expand(-1, -1, h)  # [b, r, h]
    part = torch.gather(hidden, 1, rows)  # [b, r, h]
    if position_ids is None:
        pos = idx  # [b, r]: the gather of the default positions 0..s-1 is idx itself
    else:
        assert position_ids.shape == (b, s), f"position_ids must be [b, s] = {(b, s)}"
        pos = torch.gather(position_ids, 1, idx)  # [b, r]
    pad = None
    if padding_mask is not None:
        assert padding_mask.shape == (b, s) and padding_mask.dtype == torch.bool, "padding_mask: [b, s] bool"
        pad = torch.gather(padding_mask, 1, idx)  # [b, r]
    out = layer(part, position_ids=pos, padding_mask=pad)  # [b, r, h]
    assert out.shape == part.shape and out.dtype == hidden.dtype, "layer must map [b, r, h] to [b, r, h]"
    return hidden.scatter(1, rows, out)  # [b, s, h]


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
        return layer(hidden, position_ids=position_ids, padding_mask=padding_mask)  # [b, s, h] or [b, s/tp, h]
    if tp > 1:
        return run_layer_on_kept_sequence_parallel(layer, hidden, idx, position_ids, padding_mask)  # [b, s/tp, h]
    return run_layer_on_kept(layer, hidden, idx, position_ids, padding_mask)  # [b, s, h]
