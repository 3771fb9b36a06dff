"""tools/checkpoint_util.py keeps the distributed optimizer's state: a checkpoint of --use-distributed-optimizer
converted to another TP x PP (and resumed at any DP size) continues as if training had never stopped.

distrib_optim.pt holds {"param"|"exp_avg"|"exp_avg_sq": {local parameter name: fp32 tensor}, "step"} per rank
folder, in model space; the tool merges, re-pads and splits each of those state dicts exactly like the weights.
The truth is one uninterrupted single-process run; a resume without the moments (--no-load-optim) must miss it.
"""

import os

import pytest
import torch

from megatron.checkpoint import convert as cl
from megatron.checkpoint.layout import split_model
from megatron.training.cli import run_cli
from tests.distributed.launcher import GLOO, run_distributed
from tests.functional.gpt_cli import TINY, make_pattern_data, run_inprocess, train_records
from tests.scripts import load_script
from tests.unit.checkpoint.test_layout import CONFIGS, make_args, make_model

tool = load_script("tools/checkpoint_util.py")
ITER = 3
STATES = ("param", "exp_avg", "exp_avg_sq")


# ---- the file format, on synthetic checkpoints -----------------------------------------------------------
CONFIG = CONFIGS["swiglu-bias-layernorm-tied-default-ffn"]  # tied: with PP > 1 the last stage holds a copy
OPTIMIZER = {"distributed": True, "grad_scaler": {"scale": 1024.0, "growth_tracker": 7, "hysteresis_tracker": 2},
             "param_groups": [{"lr": 5e-4, "weight_decay": 0.01, "params": [0, 1]},
                              {"lr": 5e-4, "weight_decay": 0.0, "params": [2]}]}


def full_optim_state(seed=1):
    """An unsharded distrib_optim.pt: distinct random fp32 values for every state of every parameter."""
    return {**{key: make_model(CONFIG, seed=seed + i) for i, key in enumerate(STATES)}, "step": ITER}


def write_distributed_source(root, tp, pp, model, optim, args=None):
    """A --use-distributed-optimizer checkpoint written with explicit paths, not through the writer under test."""
    args = args or make_args(CONFIG)
    shards = split_model(model, args, tp, pp)
    states = {key: split_model(optim[key], args, tp, pp) for key in STATES}
    for (t, p), shard in shards.items():
        folder = root / f"iter_{ITER:07d}" / (f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}")
        os.makedirs(folder)
        torch.save({"args": {**args, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp},
                    "iteration": ITER, "checkpoint_version": 3.0, "model": shard, "optimizer": OPTIMIZER,
                    "rng_state": {"torch": torch.get_rng_state()}, "opt_param_scheduler": {"num_steps": 24}},
                   folder / "model_optim_rng.pt")
        torch.save({**{key: states[key][(t, p)] for key in STATES}, "step": ITER}, folder / "distrib_optim.pt")
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITER))


def rank_files(root):
    """{rank folder: (model_optim_rng.pt, distrib_optim.pt or None)} of the tracker's iteration."""
    folder = root / f"iter_{ITER:07d}"
    out = {}
    for name in sorted(os.listdir(folder)):
        optim = folder / name / "distrib_optim.pt"
        out[name] = (torch.load(folder / name / "model_optim_rng.pt", weights_only=True),
                     torch.load(optim, weights_only=True) if optim.exists() else None)
    return out


def same_state(a, b):
    """Equal state dicts, bit for bit and dtype for dtype (the order of keys aside)."""
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def convert(capsys, *argv):
    code = run_cli(tool.main, [str(a) for a in argv])
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


@pytest.mark.parametrize("pp", [1, 2], ids=["tp2", "tp2pp2"])
def test_distrib_optim_round_trips_bit_exactly(tmp_path, capsys, pp):
    """TP=2 -> TP=1 -> TP=2: every rank's distrib_optim.pt comes back bit for bit, the merged one is the
    unsharded state, and the optimizer entry (scaler, param groups, distributed) is kept; RNG is dropped."""
    model, optim = make_model(CONFIG, seed=9), full_optim_state()
    write_distributed_source(tmp_path / "src", 2, pp, model, optim)
    out = convert(capsys, "--load", tmp_path / "src", "--save", tmp_path / "merged", "--merge")
    assert ("kept the distributed optimizer's state: distrib_optim.pt (param, exp_avg, exp_avg_sq; step 3) "
            "re-split for TP=1 PP=1, and its grad scaler and param groups") in out
    assert "dropped (layout-specific): rng_state; continue training from it with --no-load-rng" in out
    assert "--no-load-optim" not in out
    (merged, merged_optim), = rank_files(tmp_path / "merged").values()
    assert merged["optimizer"] == OPTIMIZER and "rng_state" not in merged
    assert merged_optim["step"] == ITER and set(merged_optim) == {*STATES, "step"}
    for key in STATES:
        assert same_state(merged_optim[key], optim[key]), key
        assert list(merged_optim[key]) == list(merged["model"]), key  # the model's keys, in its order

    convert(capsys, "--load", tmp_path / "merged", "--save", tmp_path / "back", "--target-tensor-parallel-size", 2,
            "--target-pipeline-parallel-size", pp)
    source, back = rank_files(tmp_path / "src"), rank_files(tmp_path / "back")
    assert sorted(back) == sorted(source)
    for name, (ckpt, optim_file) in source.items():
        assert back[name][0]["optimizer"] == OPTIMIZER
        assert same_state(back[name][0]["model"], ckpt["model"]), name
        assert back[name][1]["step"] == ITER and set(back[name][1]) == set(optim_file)
        for key in STATES:
            assert same_state(back[name][1][key], optim_file[key]), (name, key)
    if pp == 2:  # the last stage's copy of the tied word embeddings carries the embeddings' moments
        last = back["mp_rank_01_001"][1]["exp_avg"]["output_layer.weight"]
        assert torch.equal(last, optim["exp_avg"]["embedding.word_embeddings.weight"][64:])


def test_distrib_optim_repadded_like_the_weights(tmp_path, capsys):
    """98 ids with --make-vocab-size-divisible-by 64: 128 rows at TP=1, 256 at TP=4. The new padding rows start
    with zero weights, zero fp32 parameters and zero moments; going back restores the source bit for bit."""
    model, optim = make_model(CONFIG, seed=9), full_optim_state()
    args = {**make_args(CONFIG), "tokenizer_type": "NullTokenizer", "vocab_size": 97,
            "make_vocab_size_divisible_by": 64}
    write_distributed_source(tmp_path / "src", 1, 1, model, optim, args)
    out = convert(capsys, "--load", tmp_path / "src", "--save", tmp_path / "tp4", "--target-tensor-parallel-size", 4,
                  "--target-pipeline-parallel-size", 1)
    assert "padded vocabulary: 128 -> 256 rows for TP=4" in out
    ckpt, optim_file = rank_files(tmp_path / "tp4")["mp_rank_03"]  # rows 192..255: all padding
    key = "embedding.word_embeddings.weight"
    assert ckpt["model"][key].shape == (64, 64) and not ckpt["model"][key].any()
    for state in STATES:
        assert optim_file[state][key].shape == (64, 64) and not optim_file[state][key].any(), state
    convert(capsys, "--load", tmp_path / "tp4", "--save", tmp_path / "back", "--merge")
    (back, back_optim), = rank_files(tmp_path / "back").values()
    assert back["args"]["padded_vocab_size"] == 128 and same_state(back["model"], model)
    assert all(same_state(back_optim[state], optim[state]) for state in STATES)


def test_plain_optimizer_still_dropped_and_inconsistent_distrib_optim_refused(tmp_path, capsys):
    model, optim = make_model(CONFIG), full_optim_state()
    write_distributed_source(tmp_path / "src", 2, 1, model, optim)
    other = tmp_path / f"src/iter_{ITER:07d}/mp_rank_01/distrib_optim.pt"

    def refused(needle):
        code = run_cli(tool.main, ["--load", str(tmp_path / "src"), "--save", str(tmp_path / "out"), "--merge"])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "out").exists()

    torch.save({**torch.load(other, weights_only=True), "step": ITER + 1}, other)
    refused("the distrib_optim.pt of (TP rank, stage) (1, 0) and (0, 0) differ")
    os.remove(other)
    refused("mp_rank_01/distrib_optim.pt is missing, but other rank folders hold one")
    os.remove(tmp_path / f"src/iter_{ITER:07d}/mp_rank_00/distrib_optim.pt")  # no distrib_optim.pt at all
    out = convert(capsys, "--load", tmp_path / "src", "--save", tmp_path / "out", "--merge")
    assert "dropped (layout-specific): optimizer, rng_state; continue training from it with --no-load-optim" in out
    (ckpt, optim_file), = rank_files(tmp_path / "out").values()
    assert optim_file is None and "optimizer" not in ckpt
    assert "distrib_optim" not in cl.load_merged_checkpoint(str(tmp_path / "src"))  # evaluation reads the model only


# ---- a real run: TP=2 x DP=2 saved, TP=1 x PP=2 x DP=2 resumed ------------------------------------------
LTD = ["--random-ltd", "--random-ltd-start-seq-length", "8", "--random-ltd-seq-step", "4",
       "--random-ltd-ramp-iters", "8"]  # r = 8, 8, 12, 16, 20, 20 of 32: mid-ramp at the save
BASE = [a for a in TINY if a != "--mock-data"] + LTD + [
    "--hidden-dropout", "0", "--attention-dropout", "0", "--train-iters", "6", "--eval-iters", "0",
    "--split", "100,0,0", "--make-vocab-size-divisible-by", "64", "--global-batch-size", "8"]  # 128 rows at TP 1 and 2


def _train(rank, world, argv):
    assert run_inprocess(argv) == 0


def run_layout(argv, tp, pp, dp):
    argv = argv + GLOO + ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    if tp * pp * dp == 1:
        assert run_inprocess(argv) == 0
    else:
        run_distributed(_train, world_size=tp * pp * dp, args=(argv,), hang_after_s=120)


def rel(a, b):
    return abs(a - b) / max(abs(a), abs(b))


def test_converted_checkpoint_resumes_the_uninterrupted_run(tmp_path, capsys):
    data = make_pattern_data(tmp_path)
    argv = BASE + ["--data-path", data]
    run_layout(argv + ["--log-json", str(tmp_path / "straight.jsonl")], 1, 1, 1)
    dist = argv + ["--use-distributed-optimizer"]
    run_layout(dist + ["--ckpt-format", "torch", "--save", str(tmp_path / "tp2dp2"), "--save-interval", str(ITER), "--exit-interval", str(ITER),
                       "--log-json", str(tmp_path / "first.jsonl")], 2, 1, 2)
    out = convert(capsys, "--load", tmp_path / "tp2dp2", "--save", tmp_path / "pp2", "--target-tensor-parallel-size", 1,
                  "--target-pipeline-parallel-size", 2)
    assert "kept the distributed optimizer's state" in out and "--no-load-rng" in out
    for name, resume, dp in (("resumed", ["--no-load-rng"], 2), ("dp1", ["--no-load-rng"], 1),
                             ("no_moments", ["--no-load-rng", "--no-load-optim"], 2)):
        run_layout(dist + ["--load", str(tmp_path / "pp2"), "--log-json", str(tmp_path / f"{name}.jsonl")] + resume,
                   1, 2, dp)
    straight, first = train_records(tmp_path / "straight.jsonl"), train_records(tmp_path / "first.jsonl")
    resumed, no_moments = train_records(tmp_path / "resumed.jsonl"), train_records(tmp_path / "no_moments.jsonl")
    assert [r["iteration"] for r in straight] == [1, 2, 3, 4, 5, 6] and [r["iteration"] for r in first] == [1, 2, 3]
    assert [r["iteration"] for r in resumed] == [r["iteration"] for r in no_moments] == [4, 5, 6]
    # the file is in model space: another DP size resumes it too, with nothing converted
    dp1 = train_records(tmp_path / "dp1.jsonl")
    assert [r["iteration"] for r in dp1] == [4, 5, 6]
    assert all(rel(a["lm_loss"], b["lm_loss"]) <= 1e-5 for a, b in zip(straight[3:], dp1)), dp1
    assert [r["kept_length"] for r in straight] == [8, 8, 12, 16, 20, 20]
    for a, b in zip(straight, first + resumed):
        assert a["kept_length"] == b["kept_length"] and a["consumed_layer_tokens"] == b["consumed_layer_tokens"]
        assert rel(a["lm_loss"], b["lm_loss"]) <= 1e-5, (a["iteration"], a["lm_loss"], b["lm_loss"])
    # without the moments iteration 4 (the loaded weights) still matches; the steps after it miss by far more
    # than the tolerance (about 7e-4 and 2e-3 here: fresh Adam moments take a sign-like first step)
    assert rel(straight[3]["lm_loss"], no_moments[0]["lm_loss"]) <= 1e-5
    for a, b in zip(straight[4:], no_moments[1:]):
        assert rel(a["lm_loss"], b["lm_loss"]) > 1e-4, (a["iteration"], a["lm_loss"], b["lm_loss"])
