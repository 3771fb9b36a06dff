"""The C++ standard library's Mersenne Twisters, bit for bit, for Megatron's BERT sample index.

Megatron builds that index in C++ (`helpers.build_mapping`) with `std::mt19937(seed)` for the target
lengths and `std::mt19937_64(seed + 1)` for the shuffle; the same rows need the same raw outputs.
`std::mt19937` is numpy's MT19937 after the same seeding (`init_genrand`); `std::mt19937_64` has no numpy
counterpart and is written out here, vectorized over its 312-word state. Both hand out raw outputs, so the
caller applies Megatron's arithmetic (`r % ratio`, `r % (i + 1)`) to the numbers the C++ sees.
"""

import numpy as np

_U64 = np.uint64


class MT19937:
    """std::mt19937(seed) raw 32-bit outputs (numpy's MT19937 after the same seeding)."""

    def __init__(self, seed: int):
        key, pos = np.random.RandomState(seed).get_state()[1:3]  # init_genrand(seed), as std::mt19937
        self._bits = np.random.MT19937()
        self._bits.state = {"bit_generator": "MT19937", "state": {"key": key, "pos": pos}}

    def next(self, n: int) -> np.ndarray:
        """The next n outputs, uint64 [n] holding 32-bit values."""
        return self._bits.random_raw(n)


class MT19937_64:
    """std::mt19937_64(seed) (the 64-bit Mersenne Twister), vectorized over its 312-word state."""

    nn, mm = 312, 156

    def __init__(self, seed: int):
        mask64 = (1 << 64) - 1
        state = [seed & mask64]
        for i in range(1, self.nn):
            prev = state[-1]
            state.append((6364136223846793005 * (prev ^ (prev >> 62)) + i) & mask64)
        self._mt = np.array(state, dtype=np.uint64)
        self._left = np.zeros(0, dtype=np.uint64)  # outputs of the last twist not yet handed out

    def _twist(self) -> np.ndarray:
        nn, mm, mt = self.nn, self.mm, self._mt
        upper, lower, matrix_a = _U64(0xFFFFFFFF80000000), _U64(0x7FFFFFFF), _U64(0xB5026F5AA96619E9)

        def mix(hi, lo):  # twist of (upper bits of hi | lower bits of lo)
            x = (hi & upper) | (lo & lower)
            return (x >> _U64(1)) ^ np.where(x & _U64(1), matrix_a, _U64(0))

        # Three slices so each reads the values the sequential loop would see (old ahead, new behind).
        mt[: nn - mm] = mt[mm:] ^ mix(mt[: nn - mm], mt[1 : nn - mm + 1])
        mt[nn - mm : nn - 1] = mt[: mm - 1] ^ mix(mt[nn - mm : nn - 1], mt[nn - mm + 1 :])
        mt[nn - 1 :] = mt[mm - 1 : mm] ^ mix(mt[nn - 1 :], mt[:1])
        y = mt.copy()
        y ^= (y >> _U64(29)) & _U64(0x5555555555555555)
        y ^= (y << _U64(17)) & _U64(0x71D67FFFEDA60000)
        y ^= (y << _U64(37)) & _U64(0xFFF7EEE000000000)
        y ^= y >> _U64(43)
        return y

    def next(self, n: int) -> np.ndarray:
        """The next n outputs, uint64 [n]."""
        parts, have = [self._left], len(self._left)
        while have < n:
            parts.append(self._twist())
            have += self.nn
        out = np.concatenate(parts)
        self._left = out[n:].copy()
        return out[:n]


def mt19937_64(seed: int, n: int) -> np.ndarray:
    """The first n outputs of std::mt19937_64(seed), uint64 [n]."""
    return MT19937_64(seed).next(n)
