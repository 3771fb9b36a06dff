"""Which tokens a layer keeps: a keyed, counter-based draw.

The kept positions of global sample j (its index within the global batch) at iteration t in layer l are
a pure function of (seed, t, j, l). Nothing is drawn from a stateful generator, so

- every pipeline stage, micro-batch split, tensor-parallel rank (with or without sequence parallel)
  and activation recomputation regenerates exactly the same indices without communication;
- a resumed run draws what the uninterrupted run would have drawn;
- CPU and CUDA agree bit for bit: the hash uses only int64 add, multiply, xor, shift and mask, and no
  intermediate ever exceeds 2**49, so no device can overflow differently.

How: each (sample, position) gets a 32-bit key; the layer keeps the r positions with the smallest keys,
in ascending order. That is a uniform random subset without replacement as long as the keys behave like
a random permutation. Ties cannot happen: for a fixed sample, position -> key is a bijection of 32-bit
words (a composition of keyed xors and the invertible MurmurHash3 32-bit finalizer), so the s keys of a
row are distinct and no tie-break ever biases the draw.

The per-sample key state is 64 bits (two 32-bit lanes) absorbed from (seed, t, l, j), so two different
(seed, t, l, j) share a key function only with probability ~2**-64; within one (seed, t, l) distinct
samples always get distinct key functions (j enters through a bijection).

Glossary: n layers drawn at once, b micro batch, s sequence, r kept tokens.
"""

from typing import Sequence

import torch

_M32 = 0xFFFFFFFF
_IV_A = 0x243F6A88  # lane start values: digits of pi, i.e. "nothing up my sleeve" constants
_IV_B = 0x85A308D3


def _mul32(x, c: int):
    """x * c mod 2**32 for 32-bit x, via 16-bit halves of c so no product passes 2**49."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x):
    """A bijection of 32-bit words with full avalanche (MurmurHash3's finalizer); int or int64 tensor."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _absorb(a, b, word):
    """Fold one 32-bit word into the 64-bit state (a, b); a bijection of (a, b) for every word."""
    a = _mix32(a ^ word)
    b = _mix32((b + a) & _M32)
    return a, b


def _words(value: int, n: int):
    assert 0 <= value < 1 << (32 * n), f"{value} does not fit in {n} 32-bit words"
    return [(value >> (32 * i)) & _M32 for i in range(n)]


def position_keys(seed: int, iteration: int, sample_ids: torch.Tensor, layers: Sequence[int], seq_length: int):
    """The 32-bit random key of every (layer, sample, position), distinct within each row: [n, b, s] int64."""
    assert sample_ids.dim() == 1 and sample_ids.dtype == torch.long, "sample_ids must be a [b] LongTensor"
    state = []
    for layer in layers:  # (seed, t, l) absorbed on the host in exact Python ints
        a, b = _IV_A, _IV_B
        for word in _words(seed, 2) + _words(iteration, 2) + _words(layer, 1):
            a, b = _absorb(a, b, word)
        state.append((a, b))
    # non_blocking: a host-to-device copy that does not wait for the kernels already queued
    ab = torch.tensor(state, dtype=torch.long).to(sample_ids.device, non_blocking=True)  # [n, 2]
    a, b = _absorb(ab[:, :1], ab[:, 1:], sample_ids & _M32)  # [n, b], [n, b]
    pos = torch.arange(seq_length, dtype=torch.long, device=sample_ids.device)  # [s]
    inner = _mix32(a.unsqueeze(-1) ^ pos)  # [n, b, s], a bijection of pos for each row
    return _mix32(inner ^ b.unsqueeze(-1))  # [n, b, s]


def kept_indices_for_layers(
    seed: int, iteration: int, sample_ids: torch.Tensor, layers: Sequence[int], seq_length: int, kept_length: int
) -> torch.Tensor:
    """`kept_indices` for several layers in one batch of kernels: [n, b, r], row i for layers[i].

    On a GPU the draw is launch-bound (~90 small kernels), so one call for all LTD layers of a
    micro-batch costs about what one layer does.
    """
    assert 1 <= kept_length <= seq_length, f"kept_length must be in 1..{seq_length}, got {kept_length}"
    keys = position_keys(seed, iteration, sample_ids, layers, seq_length)  # [n, b, s]
    chosen = keys.topk(kept_length, dim=-1, largest=False, sorted=False).indices  # [n, b, r], a set: keys are distinct
    return chosen.sort(dim=-1).values  # [n, b, r]


def kept_indices(
    seed: int, iteration: int, sample_ids: torch.Tensor, layer: int, seq_length: int, kept_length: int
) -> torch.Tensor:
    """Sorted positions that `layer` keeps for each sample: [b, r] int64 on sample_ids' device.

    seed, iteration (0-based optimizer step) and layer (global, 0-based) are non-negative ints; seed and
    iteration may use up to 64 bits. sample_ids [b] are each sample's index in the global batch.
    """
    return kept_indices_for_layers(seed, iteration, sample_ids, [layer], seq_length, kept_length)[0]  # [b, r]
