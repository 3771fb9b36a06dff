"""The C++ Mersenne Twisters: the standard's check values ([rand.predef]), and the 64-bit one's state
handling across twists."""

import numpy as np

from megatron.core.datasets.mt19937 import MT19937, MT19937_64, mt19937_64


def test_rngs_match_the_cpp_standard():
    # [rand.predef]: the 10000th output of a default-constructed std::mt19937_64 / std::mt19937 (seed 5489)
    assert int(mt19937_64(5489, 10000)[-1]) == 9981545732273789042
    assert MT19937(5489).next(10000)[-1] == 4123659995


def test_outputs_do_not_depend_on_how_they_are_drawn():
    one, many = MT19937_64(7), MT19937_64(7)
    parts = [many.next(n) for n in (1, 311, 0, 313, 1000)]  # across twists of 312 words
    np.testing.assert_array_equal(np.concatenate(parts), one.next(1625))
    a, b = MT19937(7), MT19937(7)
    np.testing.assert_array_equal(np.concatenate([a.next(3), a.next(700)]), b.next(703))
