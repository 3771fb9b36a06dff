"""A wrong flag is one `error:` line, exit 2, no usage block: the shared ArgumentParser and the tools."""

import os
import subprocess
import sys

import pytest

from megatron.core.errors import UserError
from megatron.training.cli import ArgumentParser, run_cli
from tests.scripts import REPO


def test_parser_errors_are_user_errors(capsys):
    p = ArgumentParser()
    p.add_argument("--lr-decay-style")

    def main(argv):
        p.parse_args(argv)

    assert run_cli(main, ["--nope"]) == 2
    err = capsys.readouterr().err
    assert err == "error: unrecognized arguments: --nope (see --help)\n"
    with pytest.raises(UserError, match="unrecognized arguments: --lr"):
        p.parse_args(["--lr", "x"])  # no abbreviations: --lr must not mean --lr-decay-style


# Each tool with its required flags (values never used: the bad flag stops it first).
TOOLS = {
    "preprocess_data.py": ["--input", "x.jsonl", "--output-prefix", "x"],
    "merge_datasets.py": ["--input", "shards", "--output-prefix", "x"],
    "train_tokenizer.py": ["--input", "x.jsonl", "--type", "gpt2-bpe", "--vocab-size", "8", "--output-dir", "t"],
    "make_sample_corpus.py": ["--output", "x.jsonl"],
}
NO_SITE = ("train_tokenizer.py", "make_sample_corpus.py")  # stdlib-only until they parse: run with -S


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_tool_bad_flag_is_one_line(tool, tmp_path):
    # From another folder, and for the stdlib-only ones without site-packages: the tool finds the
    # checkout's `megatron` through its own sys.path insert, not an installed copy.
    flags = ["-S"] if tool in NO_SITE else []
    proc = subprocess.run([sys.executable, *flags, os.path.join(REPO, "tools", tool), *TOOLS[tool], "--no-such-flag"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == ["error: unrecognized arguments: --no-such-flag (see --help)"], proc.stderr
    assert not os.listdir(tmp_path)
