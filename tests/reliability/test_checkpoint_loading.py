"""Loading checkpoints that are damaged, half-written, malicious or of another model: one clear line, or
with --load-fallback the newest loadable older iteration; a pickled payload never runs."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron.checkpoint.model_args import check_model_flags
from megatron.core.errors import UserError
from megatron.evaluation.checkpoint_model import load_gpt_checkpoint
from tests.reliability.common import NO_EVAL, TINY, run_inprocess, train_records
from tests.scripts import load_script

FILE4 = "iter_0000004/mp_rank_00/model_optim_rng.pt"


class Payload:
    """What an attacker pickles: unpickling calls os.system (a shell command that leaves a marker)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def marker(ck):
    """The file the payload planted in `ck` creates if it ever runs (beside `ck`, fresh for each test)."""
    return ck.parent / "payload_ran"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Iterations 2 and 4 of a tiny 6-iteration run."""
    root = tmp_path_factory.mktemp("base") / "ck"
    assert run_inprocess(TINY + NO_EVAL + ["--train-iters", "6", "--save-interval", "2", "--exit-interval", "4",
                                           "--save", str(root)]) == 0
    return root


def malicious(ck, name=FILE4):
    good = torch.load(ck / name, weights_only=True)
    torch.save({**good, "rng_state": Payload(marker(ck))}, ck / name)  # everything else intact


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "tracker garbage": (lambda ck: (ck / "latest_checkpointed_iteration.txt").write_text("4x"),
                        "holds '4x', not an iteration number", 4),
    "folder missing": (lambda ck: shutil.rmtree(ck / "iter_0000004"), f"{FILE4} is missing", 2),
    "truncated file": (lambda ck: truncate(ck / FILE4), "the file is damaged", 2),
    "pickled payload": (malicious, "it holds a pickled Python object (posix.system), which is never run", 2),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_fails_clearly_or_falls_back(tmp_path, capsys, base, case):
    damage, needle, fallback_iteration = DAMAGE[case]
    ck = tmp_path / "ck"
    shutil.copytree(base, ck)
    damage(ck)
    argv = TINY + NO_EVAL + ["--train-iters", "6", "--load", str(ck), "--save", str(ck),
                             "--log-json", str(tmp_path / "m.jsonl")]
    assert run_inprocess(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert "pass --load-fallback to resume from the newest loadable older iteration" in err[0]
    assert not (tmp_path / "m.jsonl").exists()
    assert run_inprocess(argv + ["--load-fallback"]) == 0
    out = capsys.readouterr().out
    assert f"--load-fallback: trying iteration {fallback_iteration}" in out and needle in out
    assert train_records(tmp_path / "m.jsonl")[0]["iteration"] == fallback_iteration + 1
    assert not marker(ck).exists()


def test_missing_tracker_resumes_from_the_newest_complete_iteration(tmp_path, capsys, base):
    """A save killed between its folder rename and its tracker write (the first save of a run), or a
    lost tracker: complete folders exist only after all writes succeeded, so the newest is taken."""
    ck = tmp_path / "ck"
    shutil.copytree(base, ck)
    os.remove(ck / "latest_checkpointed_iteration.txt")
    log = tmp_path / "m.jsonl"
    assert run_inprocess(TINY + NO_EVAL + ["--train-iters", "6", "--load", str(ck), "--log-json", str(log)]) == 0
    assert "is missing; resuming from the newest complete iteration, 4" in capsys.readouterr().out
    assert train_records(log)[0]["iteration"] == 5


def test_nothing_loadable_even_with_fallback(tmp_path, capsys, base):
    ck = tmp_path / "ck"
    shutil.copytree(base, ck)
    truncate(ck / FILE4)
    malicious(ck, FILE4.replace("4", "2"))
    assert run_inprocess(TINY + NO_EVAL + ["--train-iters", "6", "--load", str(ck), "--load-fallback"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: no loadable checkpoint in {ck}: refused checkpoint") and not marker(ck).exists()


def test_half_written_folder_is_ignored_reported_and_removed(tmp_path, capsys, base):
    ck = tmp_path / "ck"
    shutil.copytree(base, ck)
    shutil.copytree(ck / "iter_0000004", ck / "iter_0000006.tmp")  # a save killed before its rename
    truncate(ck / "iter_0000006.tmp/mp_rank_00/model_optim_rng.pt")
    assert run_inprocess(TINY + NO_EVAL + ["--train-iters", "6", "--load", str(ck), "--save", str(ck)]) == 0
    out = capsys.readouterr().out
    assert f"WARNING: ignoring {ck}/iter_0000006.tmp: a save that was interrupted (never loaded" in out
    assert "successfully loaded checkpoint from" in out and "at iteration 4" in out
    assert f"WARNING: removed {ck}/iter_0000006.tmp: an interrupted save, never loaded" in out
    assert sorted(os.listdir(ck)) == ["iter_0000002", "iter_0000004", "iter_0000006",
                                      "latest_checkpointed_iteration.txt"]


def test_payload_is_refused_by_evaluation_and_conversion(tmp_path, base):
    """Our refusal, never torch's raw "Weights only load failed"; and the planted payload is live: a full
    unpickle (in a child process) does run it, so the refusal is what kept it from running here."""
    ck = tmp_path / "ck"
    shutil.copytree(base, ck)
    malicious(ck)
    refusal = r"^refused checkpoint .*: it holds a pickled Python object \(posix\.system\), which is never run"
    with pytest.raises(UserError, match=refusal):
        load_gpt_checkpoint(str(ck))
    with pytest.raises(UserError, match=refusal):
        load_script("tools/checkpoint_util.py").main(["--load", str(ck), "--save", str(tmp_path / "out"), "--merge"])
    assert not marker(ck).exists() and not (tmp_path / "out").exists()
    unsafe = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run([sys.executable, "-c", unsafe, str(ck / FILE4)], check=True, timeout=120, capture_output=True)
    assert marker(ck).exists()


def test_evaluation_of_a_folder_with_only_a_half_written_save(tmp_path, base):
    shutil.copytree(base / "iter_0000002", tmp_path / "ck" / "iter_0000002.tmp")
    with pytest.raises(UserError, match="holds no checkpoint"):
        load_gpt_checkpoint(str(tmp_path / "ck"))


@pytest.mark.parametrize("flags, damage, needle", [
    (["--num-layers", "2", "--hidden-size", "64"], None,
     "has another model: --num-layers 4 in the checkpoint, 2 here; --hidden-size 32 in the checkpoint, 64 here"),
    (["--swiglu"], None, "--swiglu False in the checkpoint, True here"),
    ([], lambda ck: shutil.copytree(ck / "iter_0000004/mp_rank_00", ck / "iter_0000004/mp_rank_01"),
     "was saved with tensor x pipeline parallel 2 x 1, this run uses 1 x 1"),
    (["--max-position-embeddings", "64", "--norm-epsilon", "1e-6"], None,
     "--norm-epsilon 1e-05 in the checkpoint, 1e-06 here; --max-position-embeddings 32 in the checkpoint, 64 here"),
    (["--max-position-embeddings", "64", "--disable-bias-linear"], lambda ck: forget_args(
        ck, "max_position_embeddings", "disable_bias_linear"),
     "4 in {ck} does not fit this model: unexpected keys decoder.layers.0.self_attention.linear_qkv.bias, "
     "decoder.layers.0.self_attention.linear_proj.bias, decoder.layers.0.mlp.linear_fc1.bias (+13 more); "
     "shapes differ: embedding.position_embeddings.weight [32, 32] in the checkpoint, [64, 32] here"),
], ids=["shape", "swiglu", "layout", "positions-epsilon", "older-args-state-dict"])
def test_mismatch_says_what_differs(tmp_path, capsys, base, flags, damage, needle):
    """Every differing model flag in one line; for a checkpoint whose args do not record a flag (older
    runs), the state-dict mismatch itself: the keys and the shapes that differ."""
    ck = tmp_path / "ck"
    shutil.copytree(base, ck)
    if damage:
        damage(ck)
    assert run_inprocess(TINY + NO_EVAL + ["--train-iters", "6", "--load", str(ck)] + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: checkpoint iteration ") and needle.format(ck=ck) in err[0], err


def forget_args(ck, *keys):
    """The tracker's checkpoint as an older run wrote it: its args do not record `keys`."""
    ckpt = torch.load(ck / FILE4, weights_only=True)
    torch.save({**ckpt, "args": {k: v for k, v in ckpt["args"].items() if k not in keys}}, ck / FILE4)


def test_position_and_bert_flags_are_compared_where_they_matter():
    """rope has no position table (its size may change), learned positions no base; BERT's
    --bert-no-binary-head is named as the user types it."""
    saved = dict(position_embedding_type="rope", rotary_base=10000, max_position_embeddings=32,
                 norm_epsilon=1e-5, bert_binary_head=True)
    check_model_flags(saved, {**saved, "max_position_embeddings": 64}, "ck")
    with pytest.raises(UserError, match=r"^ck has another model: --bert-no-binary-head False in the checkpoint, "
                                        r"True here; --rotary-base 10000 in the checkpoint, 500000 here; "):
        check_model_flags(saved, {**saved, "rotary_base": 500000, "bert_binary_head": False}, "ck")
    learned = {**saved, "position_embedding_type": "learned_absolute"}
    check_model_flags(learned, {**learned, "rotary_base": 500000}, "ck")
    with pytest.raises(UserError, match="--max-position-embeddings 32 in the checkpoint, 64 here"):
        check_model_flags(learned, {**learned, "max_position_embeddings": 64}, "ck")


def test_finetune_no_load_optim_no_load_rng(tmp_path, base):
    """Straight 6 iterations vs resuming the same run's iteration 4 with each flag (dropout is on)."""
    argv = TINY + NO_EVAL + ["--train-iters", "6"]
    assert run_inprocess(argv + ["--log-json", str(tmp_path / "s.jsonl")]) == 0
    straight_records = train_records(tmp_path / "s.jsonl")
    straight = [r["lm_loss"] for r in straight_records]
    runs = {}
    for flag in ("--finetune", "--no-load-optim", "--no-load-rng"):
        log = tmp_path / f"{flag}.jsonl"
        assert run_inprocess(argv + ["--load", str(base), flag, "--log-json", str(log)]) == 0
        runs[flag] = train_records(log)
    assert [r["iteration"] for r in runs["--finetune"]] == list(range(1, 7))  # iteration and schedule restart
    assert runs["--finetune"][0]["lr"] == 0.0 and runs["--finetune"][0]["consumed_samples"] == 4
    opt, rng = runs["--no-load-optim"], runs["--no-load-rng"]
    assert [r["iteration"] for r in opt] == [r["iteration"] for r in rng] == [5, 6]
    assert opt[0]["lm_loss"] == straight[4] and opt[1]["lm_loss"] != straight[5]  # fresh Adam moments
    assert [r["lr"] for r in opt] == [r["lr"] for r in straight_records[4:]]  # the LR schedule carries on
    assert rng[0]["lm_loss"] != straight[4]  # other dropout masks

    # --finetune did load the weights: one step at LR 0 saves exactly the checkpoint's tensors
    out = tmp_path / "ft"
    assert run_inprocess(TINY + NO_EVAL + ["--train-iters", "1", "--lr", "0", "--min-lr", "0", "--lr-warmup-iters",
                                           "0", "--load", str(base), "--finetune", "--save", str(out)]) == 0
    source = torch.load(base / FILE4, weights_only=True)["model"]
    saved = torch.load(out / "iter_0000001/mp_rank_00/model_optim_rng.pt", weights_only=True)["model"]
    assert list(saved) == list(source) and all(torch.equal(saved[k], source[k]) for k in source)


def test_every_torch_load_in_the_code_is_weights_only():
    """Static guard: no torch.load in the package, tools or entry points without weights_only=True."""
    import ast

    from tests.functional.gpt_cli import REPO

    files = [os.path.join(d, f) for top in ("megatron", "tools") for d, _, fs in os.walk(os.path.join(REPO, top))
             for f in fs if f.endswith(".py")] + [os.path.join(REPO, f) for f in os.listdir(REPO) if f.endswith(".py")]
    calls = unsafe = 0
    for path in files:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load":
                calls += 1
                flag = [k.value for k in node.keywords if k.arg == "weights_only"]
                unsafe += not (flag and isinstance(flag[0], ast.Constant) and flag[0].value is True)
    assert calls >= 1 and unsafe == 0
