"""Megatron's vocab padding: round up to a multiple of make_vocab_size_divisible_by * TP."""

import pytest

from megatron.core.errors import UserError
from megatron.core.tokenizer import vocab_size_with_padding


@pytest.mark.parametrize("orig, divisible_by, tp, padded", [
    (50257, 128, 1, 50304),  # GPT-2 with Megatron's default: the familiar 50304
    (50257, 128, 2, 50432),  # multiple of 256
    (50257, 128, 8, 51200),  # multiple of 1024
    (50304, 128, 1, 50304),  # already a multiple: unchanged
    (1, 128, 1, 128),
    (101, 1, 1, 101),  # divisible_by 1, TP 1: no padding
    (30522, 128, 1, 30592),  # BERT's vocab
    (32000, 64, 4, 32000),
])
def test_megatron_examples(orig, divisible_by, tp, padded):
    assert vocab_size_with_padding(orig, divisible_by, tp) == padded


def test_smallest_multiple_not_below_orig():
    for orig in range(1, 600, 7):
        for divisible_by, tp in [(1, 1), (3, 2), (8, 1), (128, 1), (64, 3)]:
            m = divisible_by * tp
            padded = vocab_size_with_padding(orig, divisible_by, tp)
            assert padded % m == 0 and orig <= padded < orig + m


def test_bad_flags():
    with pytest.raises(UserError, match="--make-vocab-size-divisible-by"):
        vocab_size_with_padding(100, 0, 1)
    with pytest.raises(UserError, match="--tensor-model-parallel-size"):
        vocab_size_with_padding(100, 128, 0)
