"""bench/memory.py: its computed bytes equal what a real training step allocates, and both equal the
bytes-per-parameter rules written down independently here (fp32 16·N, bf16 18·N, the distributed
optimizer's shards of a 64-aligned, lcm(dp, 128)-padded bucket).

A tiny GPT (3 layers, layer 1 drops tokens to r = 16 of s = 64), measured once per setting (about a
second each): fp32 with dropout 0.1 (torch's math attention on the CPU), bf16 without dropout (the flash
kernel), bf16 with the distributed optimizer on 2 gloo ranks, and fp32 at TP = 2 without and with
--sequence-parallel.
"""

import importlib.util
import math
import os

import pytest

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.config import TransformerConfig
from megatron.training.cli import run_cli

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("bench_memory", os.path.join(REPO, "bench", "memory.py"))
memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(memory)

L, H, HEADS, S, B, R, VOCAB = 3, 64, 4, 64, 2, 16, 256  # NullTokenizer --vocab-size 255: 256 ids, padded 256
TINY = ["--num-layers", str(L), "--hidden-size", str(H), "--num-attention-heads", str(HEADS), "--seq-length", str(S),
        "--micro-batch-size", str(B), "--vocab-size", str(VOCAB - 1), "--kept-length", str(R)]
ACT_TOLERANCE = 0.01  # relative; the CPU formula is exact today, the margin is for kernel changes in torch


def param_numels():
    """The tiny GPT's parameters, in registration order, counted on a model built here."""
    config = TransformerConfig(num_layers=L, hidden_size=H, num_attention_heads=HEADS, seq_length=S, vocab_size=VOCAB)
    return [p.numel() for p in GPTModel(config).parameters()]


def total_params() -> int:
    return sum(param_numels())


def run(*extra):
    setup, _ = memory.resolve(TINY + ["--device", "cpu"] + list(extra))  # the kernels measure() runs
    return setup, memory.measure(setup)


@pytest.fixture(scope="module")
def fp32():
    return run()


@pytest.fixture(scope="module")
def bf16():
    return run("--bf16", "--hidden-dropout", "0", "--attention-dropout", "0")


@pytest.fixture(scope="module")
def tp2():
    """TP = 2 without and with sequence parallelism; fp32 with dropout, so the masks are measured too."""
    return run("--tensor-model-parallel-size", "2"), run("--tensor-model-parallel-size", "2", "--sequence-parallel")


@pytest.fixture(scope="module")
def bf16_dist():
    return run("--bf16", "--hidden-dropout", "0", "--attention-dropout", "0", "--world-size", "2",
               "--use-distributed-optimizer")


def assert_computed_equals_measured(setup, results):
    for res in results:
        assert memory.computed_for_rank(setup, res) == res["state"], f"rank {res['rank']}"


def test_fp32_is_16_bytes_per_parameter(fp32):
    setup, (res,) = fp32
    n = total_params()
    assert res["state"] == {"params": 4 * n, "grads": 4 * n, "main": 0, "grad_copy": 0, "adam": 8 * n}
    assert_computed_equals_measured(setup, [res])


def test_bf16_is_18_bytes_per_parameter(bf16):
    setup, (res,) = bf16
    n = total_params()
    assert res["state"] == {"params": 2 * n, "grads": 4 * n, "main": 4 * n, "grad_copy": 0, "adam": 8 * n}
    assert_computed_equals_measured(setup, [res])


def test_distributed_optimizer_shards_main_and_adam_state(bf16, bf16_dist):
    """Each of 2 ranks holds the whole padded buffers and the fp32 main params, m and v of its half of the
    bucket: half of the plain run's optimizer state, less the padding that falls in its half."""
    setup, results = bf16_dist
    plain = bf16[1][0]["state"]
    # the layout rule, independently: reverse order, starts aligned to 64, the end padded to lcm(2, 128)
    spans, offset = [], 0
    for numel in reversed(param_numels()):
        offset = -(-offset // 64) * 64
        spans.append((offset, offset + numel))
        offset += numel
    padded = -(-offset // math.lcm(2, 128)) * math.lcm(2, 128)
    for rank, res in enumerate(results):
        lo, hi = rank * padded // 2, (rank + 1) * padded // 2
        owned = sum(max(0, min(e, hi) - max(s, lo)) for s, e in spans)
        padding_in_half = padded // 2 - owned
        assert res["state"] == {"params": 2 * padded, "grads": 4 * padded, "main": 4 * owned, "grad_copy": 0,
                                "adam": 8 * owned}
        # half the plain run's m and v, corrected by how the bucket's padding splits between the halves
        assert res["state"]["adam"] == plain["adam"] / 2 + 8 * ((padded - total_params()) / 2 - padding_in_half)
    assert sum(res["state"]["adam"] for res in results) == plain["adam"]
    assert sum(res["state"]["main"] for res in results) == plain["main"]
    assert_computed_equals_measured(setup, results)


@pytest.mark.parametrize("which", ["fp32", "bf16", "bf16_dist"])
def test_activation_formula_matches_saved_tensors(which, request):
    setup, results = request.getfixturevalue(which)
    beta = setup.config.training.params_dtype.itemsize
    res = results[0]
    for rec in memory.RECOMPUTE:
        dense, ltd = memory.measured_layers(setup, res, rec)
        for n, measured in ((S, dense), (R, ltd)):
            computed = memory.layer_bytes(setup, n, rec)
            assert abs(measured - computed) <= ACT_TOLERANCE * computed, (rec, n, measured, computed)
    none, _ = memory.measured_layers(setup, res, "none")
    full_dense, full_ltd = memory.measured_layers(setup, res, "full")
    # full recompute keeps only each layer's [b, s, h] input, dense or LTD
    assert full_dense == full_ltd == beta * B * S * H
    expected = memory.layer_bytes(setup, S, "none") / memory.layer_bytes(setup, S, "full")
    assert abs(none / full_dense - expected) <= ACT_TOLERANCE * expected
    # an LTD layer saves the layer's own share at r and its int32 row numbers, nothing of [b, s, h]
    parts = memory.measured_parts(setup, [res], "none")
    assert parts[1]["routing"] == 4 * B * R
    assert parts[1]["sequence"] + parts[1]["tensor"] <= (parts[0]["sequence"] + parts[0]["tensor"]) * R / S


def test_sequence_parallel_splits_norms_dropout_residual_by_tp(tp2):
    """With --sequence-parallel at TP = 2 a rank keeps half of what the norms, dropouts and residual stream
    save (exactly, measured), the same attention and MLP internals, and an LTD layer keeps its int32 route
    instead of its int32 row numbers. Every rank's model state, every dense layer on every rank and the
    LTD layer (its route averaged over the TP ranks) equal the formula exactly."""
    (off, off_results), (on, on_results) = tp2
    assert on.sp and not off.sp
    for setup, results in tp2:
        assert sorted(res["tp_rank"] for res in results) == [0, 1]
        assert_computed_equals_measured(setup, results)
        for rec in memory.RECOMPUTE:
            for res in results:
                dense, _ = memory.measured_parts(setup, [res], rec)
                assert dense == memory.layer_parts(setup, S, rec), (setup.sp, rec, res["rank"])
            _, ltd = memory.measured_parts(setup, results, rec)
            assert ltd == memory.layer_parts(setup, R, rec), (setup.sp, rec)
    for rec in memory.RECOMPUTE:
        no = memory.measured_parts(off, off_results, rec)
        yes = memory.measured_parts(on, on_results, rec)
        for kind in (0, 1):  # dense, LTD
            assert yes[kind]["sequence"] * 2 == no[kind]["sequence"] > 0, (rec, kind)
            assert yes[kind]["tensor"] == no[kind]["tensor"], (rec, kind)
    # recompute none, by the rules: 4 [b, n, h] fp32 tensors, 2 fp32 dropout masks, mean and rstd of 2 norms
    no, yes = memory.measured_parts(off, off_results, "none"), memory.measured_parts(on, on_results, "none")
    for (dense, ltd), t in ((no, 1), (yes, 2)):
        assert dense["sequence"] == (B * S * H * (4 * 4 + 2 * 4) + 4 * B * S * 4) / t
        assert ltd["sequence"] == (B * R * H * (4 * 4 + 2 * 4) + 4 * B * R * 4) / t
    assert no[1]["routing"] == 4 * B * R  # the int32 row numbers, nothing of [b, s, h]
    # per rank 4·(2·kept tokens in its chunk + B·R/2 list slots), int32; the chunks hold all B·R kept tokens
    assert sum(res["layers"]["none"]["1"]["routing"] for res in on_results) == 4 * (2 * B * R + B * R)


def test_cli_prints_tables_and_refuses_bad_input(capsys):
    assert run_cli(memory.main, TINY + ["--markdown", "--all-modes"]) == 0
    out = capsys.readouterr().out
    assert "| bf16 | distributed, dp 1 |" in out and "| full (uniform, 1 layer) |" in out
    tp2 = ["--tensor-model-parallel-size", "2", "--world-size", "2", "--sequence-parallel"]
    assert run_cli(memory.main, TINY + tp2 + ["--markdown"]) == 0
    rows = [x for x in capsys.readouterr().out.splitlines() if x.startswith("| norms, dropout, residual |")]
    assert len(rows) == 1 and rows[0].count("| 0.5000 |") == 2, rows  # dense and LTD layer, 1/tp
    big = ["--num-layers", "24", "--hidden-size", "2048", "--num-attention-heads", "16", "--seq-length", "2048",
           "--micro-batch-size", "4", "--measure"]
    for argv, needle in ((big, "too big"), (TINY + ["--kept-length", "65"], "--kept-length"),
                         (TINY + ["--tensor-model-parallel-size", "3", "--world-size", "3"], "divisible"),
                         (TINY + tp2 + ["--kept-length", "15"], "splits the kept tokens"),
                         (TINY + ["--measure", "--device", "cuda"], "--device cpu")):
        assert run_cli(memory.main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
