"""torch_dist checkpoints resume in any layout, optimizer included, and repeat the uninterrupted run.

The truth is layout invariance: a run stopped at iteration 6 and resumed in another TP x PP x DP (or
one process) must continue exactly as the uninterrupted run did, which only holds if the weights, the
fp32 main parameters and both Adam moments come back for every parameter, re-sliced for the new layout
(distributed-optimizer shards included), and the counters, LR schedule and random-LTD state too.

A tiny GPT, fp32, dropout off, random-LTD mid-ramp, the distributed optimizer: saved at iteration 6 of
TP=2 x PP=2 x DP=2 (tied embeddings across stages), resumed at TP=1 x PP=2 x DP=4, at TP=4 x PP=1 x
DP=2 (plain optimizer, sequence parallel) and in one process; iterations 7-12 within 1e-5 of the uninterrupted run. The
same with --async-save. On disk, one copy of model + optimizer state: DP replicas are written once, and
the writing is shared by all eight ranks (each file within 2x of the mean).
"""

import os
import shutil

import pytest

from tests.distributed.test_gpt_equivalence import BASE, LTD, close, data, run_layout  # noqa: F401 (fixture)
from tests.functional.gpt_cli import train_records

def _set(argv, **flags):
    """argv with the values of `flags` (--train-iters -> train_iters) replaced."""
    argv = list(argv)
    for name, value in flags.items():
        argv[argv.index("--" + name.replace("_", "-")) + 1] = str(value)
    return argv


# --make-vocab-size-divisible-by 32: the padded vocabulary (97 -> 128) is the same at TP 1, 2 and 4, so
# the TP=4 run computes the same logits (padding rows take part in the softmax)
ARGS = _set(BASE, train_iters=12, make_vocab_size_divisible_by=32)
LTD12 = _set(LTD, random_ltd_ramp_iters=12)
DIST = ["--use-distributed-optimizer"]


def _at_iteration(src, dst, iteration=6):
    """A checkpoint root holding only iteration `iteration` of `src`."""
    name = f"iter_{iteration:07d}"
    shutil.copytree(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(dst, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write(str(iteration))


def _check_continues(ref, recs, what):
    assert [r["iteration"] for r in recs] == list(range(7, 13)), what
    for a, b in zip(ref[6:], recs):
        assert a["kept_length"] == b["kept_length"], what
        assert close(a["lm_loss"], b["lm_loss"], 1e-5), (what, a["iteration"], a["lm_loss"], b["lm_loss"])
        assert close(a["grad_norm"], b["grad_norm"], 1e-4), (what, a["iteration"], a["grad_norm"], b["grad_norm"])


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_resume_in_other_layouts_repeats_the_run(tmp_path, data, async_save):  # noqa: F811
    argv = ARGS + ["--data-path", data, "--eval-iters", "0"] + LTD12
    ref_log = tmp_path / "ref.jsonl"
    extra = ["--async-save"] if async_save else []
    run_layout(argv + DIST + extra + ["--save", str(tmp_path / "a"), "--save-interval", "6", "--log-json",
                                      str(ref_log)], 2, 2, 2)
    ref = train_records(ref_log)
    assert [r["iteration"] for r in ref] == list(range(1, 13)) and ref[6]["kept_length"] < 32
    folder = tmp_path / "a" / "iter_0000006"
    assert (folder / ".metadata").is_file() and (folder / "common.json").is_file()
    assert not list(tmp_path.glob("a/*.tmp"))

    # one copy: the chunks hold 4 bytes of weights + 8 of moments per parameter (fp32), and the files hold
    # exactly the items the metadata indexes (a DP replica written twice would be bytes nobody indexes)
    from megatron.checkpoint.dcp_io import read_metadata

    n = _parameter_count(tmp_path / "a")
    md = read_metadata(str(folder))
    chunk_bytes = sum(c.sizes.numel() * v.properties.dtype.itemsize for v in md.state_dict_metadata.values()
                      for c in v.chunks)
    assert chunk_bytes == 12 * n, (chunk_bytes, n)
    sizes = [os.path.getsize(folder / f"__{rank}_0.distcp") for rank in range(8)]  # every rank wrote its file
    assert sum(sizes) == sum(info.length for info in md.storage_data.values()), sizes
    # the work is spread: the two DP replicas of each (TP, PP) shard share it, no rank writes it all
    assert max(sizes) < 2 * sum(sizes) / len(sizes) and min(sizes) > sum(sizes) / len(sizes) / 2, sizes

    sp = ["--sequence-parallel"]  # the same parameters: checkpoints move between SP and non-SP
    layouts = [(1, 2, 4, DIST), (4, 1, 2, sp), (1, 1, 1, DIST)] if not async_save else [(1, 2, 4, [])]
    for tp, pp, dp, opt in layouts:
        root = tmp_path / f"r{tp}{pp}{dp}"
        _at_iteration(tmp_path / "a", root)
        log = root / "log.jsonl"
        run_layout(argv + opt + ["--load", str(root), "--save", str(root), "--log-json", str(log)], tp, pp, dp)
        _check_continues(ref, train_records(log), (tp, pp, dp, opt))


def _parameter_count(root) -> int:
    from megatron.checkpoint.reader import load_unsharded_checkpoint

    model = load_unsharded_checkpoint(str(root), 6).model
    return sum(v.numel() for v in model.values())
