"""--use-checkpoint-args: a run that names no model or tokenizer flag takes them from its --load checkpoint
(Megatron's flag), so a checkpoint trained with SwiGLU, the tanh GELU and NullTokenizer fine-tunes
without repeating them; without --load it is one error line."""

import re

from megatron.checkpoint.saved_flags import checkpoint_flags
from tests.functional.gpt_cli import TINY, assert_one_error_line, run_subprocess

RUN = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--mock-data", "--num-workers", "0",
       "--train-iters", "2", "--log-interval", "1", "--eval-iters", "0", "--seq-length", "32"]


def test_model_and_tokenizer_come_from_the_checkpoint(tmp_path):
    ck = str(tmp_path / "a")
    assert run_subprocess(TINY + ["--train-iters", "4", "--save", ck, "--swiglu", "--openai-gelu"]).returncode == 0
    root, iteration, layout, saved = checkpoint_flags(ck)
    assert (iteration, layout, saved.model_type) == (4, (1, 1), "gpt")
    assert {"--swiglu", "--openai-gelu"} <= set(saved.model) and saved.model[:2] == ["--num-layers", "4"]
    assert saved.tokenizer == ["--tokenizer-type", "NullTokenizer", "--vocab-size", "97"]
    proc = run_subprocess(RUN + ["--load", ck, "--finetune", "--use-checkpoint-args", "--save", str(tmp_path / "b")])
    assert proc.returncode == 0, proc.stderr
    for flag, value in (("swiglu", "True"), ("openai_gelu", "True"), ("num_layers", "4"), ("vocab_size", "97")):
        assert re.search(rf"^  {flag} \.+ {value}$", proc.stdout, re.M), flag
    assert "loaded weights from" in proc.stdout


def test_without_load_it_is_one_line():
    assert_one_error_line(run_subprocess(RUN + ["--use-checkpoint-args"]), "add --load DIR")
