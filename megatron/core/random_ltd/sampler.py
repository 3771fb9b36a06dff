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

Two implementations of the one hash, equal bit for bit (tests/unit/random_ltd/test_sampler.py):

- `kept_indices_for_layers`: torch, on any device, int64 arithmetic; the reference, and the draw for a
  state built without indices (tests, tools).
- `kept_indices_host`: numpy on the host in native uint32 arithmetic (a multiply wraps mod 2**32 by
  itself, so a mix is 8 array passes instead of ~30 small kernels), int32 out. The trainer draws a whole
  iteration with it ahead of the step (`plan.py`), so no draw kernel and no host-to-device copy of the
  sample ids sits on the device's critical path.

Glossary: n layers drawn at once, b micro batch, s sequence, r kept tokens.
"""

from typing import Sequence

import numpy as np
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


def _layer_lanes(seed: int, iteration: int, layers: Sequence[int]):
    """The 64-bit state (a, b) after absorbing (seed, t, l), per layer, in exact Python ints."""
    state = []
    for layer in layers:
        a, b = _IV_A, _IV_B
        for word in _words(seed, 2) + _words(iteration, 2) + _words(layer, 1):
            a, b = _absorb(a, b, word)
        state.append((a, b))
    return state


def position_keys(seed: int, iteration: int, sample_ids: torch.Tensor, layers: Sequence[int], seq_length: int):
    """The 32-bit random key of every (layer, sample, position), distinct within each row: [n, b, s] int64."""
    assert sample_ids.dim() == 1 and sample_ids.dtype == torch.long, "sample_ids must be a [b] LongTensor"
    state = _layer_lanes(seed, iteration, layers)  # (seed, t, l) absorbed on the host
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


def _mix32_host(x: np.ndarray) -> np.ndarray:
    """`_mix32` on a uint32 array, in place: uint32 products wrap mod 2**32, which is what `_mul32` computes."""
    x ^= x >> 16
    x *= np.uint32(0x85EBCA6B)
    x ^= x >> 13
    x *= np.uint32(0xC2B2AE35)
    x ^= x >> 16
    return x


def kept_indices_host(seed: int, iteration: int, sample_ids: np.ndarray, layers: Sequence[int], seq_length: int,
                      kept_length: int) -> np.ndarray:
    """`kept_indices_for_layers` on the host with numpy, bit for bit: [n, b, r] int32 for sample_ids [b].

    The r smallest of s distinct keys are one set, so argpartition + sort picks exactly what topk + sort does.
    """
    assert 1 <= kept_length <= seq_length, f"kept_length must be in 1..{seq_length}, got {kept_length}"
    assert seq_length < 2 ** 31, "positions must fit in int32"
    ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)  # [b]
    assert (ids >= 0).all(), "sample ids are non-negative"
    lanes = np.array(_layer_lanes(seed, iteration, layers), dtype=np.uint32).reshape(-1, 2)  # [n, 2]
    a = _mix32_host(lanes[:, :1] ^ (ids & _M32).astype(np.uint32))  # [n, b]
    b = _mix32_host(lanes[:, 1:] + a)  # [n, b], the sum wraps mod 2**32 like `(b + a) & _M32`
    keys = a[:, :, None] ^ np.arange(seq_length, dtype=np.uint32)  # [n, b, s]
    keys = _mix32_host(_mix32_host(keys) ^ b[:, :, None])  # [n, b, s]
    if kept_length == seq_length:
        chosen = np.broadcast_to(np.arange(seq_length, dtype=np.int32), keys.shape)  # [n, b, s]
    else:
        chosen = np.argpartition(keys, kept_length - 1, axis=-1)[..., :kept_length]  # [n, b, r], a set
    return np.sort(chosen, axis=-1).astype(np.int32)  # [n, b, r]
