"""--sequence-parallel flags: at TP = 1 it is turned off with one warning line (Megatron's rule) and the run
goes on; a sequence or kept-length step that does not split over the TP ranks is one error line."""

import pytest

from megatron.core.errors import UserError
from megatron.training.arguments import parse_args
from megatron.training.config import resolve_config
from tests.functional.gpt_cli import TINY, run_subprocess


def test_sequence_parallel_at_tp1_warns_once_and_trains(tmp_path):
    proc = run_subprocess(TINY + ["--train-iters", "4", "--sequence-parallel", "--log-json", str(tmp_path / "m.jsonl")])
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["WARNING: --sequence-parallel has no effect with --tensor-model-parallel-size 1; turned off"]
    assert (tmp_path / "m.jsonl").is_file()


def _resolve(*flags, world=2):
    return resolve_config(parse_args(TINY + ["--train-iters", "3", "--tensor-model-parallel-size", "2", *flags]),
                          97, world_size=world)


@pytest.mark.parametrize("flags, needle", [
    (["--seq-length", "33"], "--seq-length 33 is not divisible by --tensor-model-parallel-size 2"),
    (["--random-ltd", "--random-ltd-ramp-iters", "2", "--random-ltd-start-seq-length", "9",
      "--random-ltd-seq-step", "3"], "--random-ltd-seq-step 3 is not divisible by --tensor-model-parallel-size 2"),
], ids=["sequence", "ltd-step"])
def test_sequence_parallel_needs_even_splits(flags, needle):
    with pytest.raises(UserError, match=needle):
        _resolve("--sequence-parallel", *flags)


def test_sequence_parallel_resolves_into_the_model_config():
    assert _resolve("--sequence-parallel").model.sequence_parallel
    assert not _resolve().model.sequence_parallel
    assert _resolve("--sequence-parallel").args["sequence_parallel"] is True
