"""--torch-compile under tensor and sequence parallelism: each rank's compiled layers compute what its eager
layers compute, dropout included, with random-LTD's kept tokens routed between the ranks.

At TP > 1 the attention-dropout fork (per-rank stream) and, with sequence parallelism, the hidden-dropout
forks run outside the compiled graphs, and the TP collectives are traced by dynamo; "aot_eager" keeps the
compile to seconds (tests/unit/transformer/test_compile.py runs inductor itself).
"""

import pytest
import torch

from tests.distributed.launcher import run_distributed
from tests.unit.transformer.test_compile import assert_close, build, step


def _check(rank, world, sequence_parallel):
    torch._dynamo.reset()
    eager = build(None, sequence_parallel=sequence_parallel)
    compiled = build("aot_eager", sequence_parallel=sequence_parallel)
    for iteration, kept in enumerate((16, 24)):  # r changes (and divides over the 2 ranks)
        assert_close(step(eager, kept, iteration), step(compiled, kept, iteration))


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2-sp"])
def test_compiled_equals_eager_at_tp2(sequence_parallel):
    run_distributed(_check, 2, tp=2, args=(sequence_parallel,))
