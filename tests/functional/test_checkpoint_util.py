"""tools/checkpoint_util.py on disk: split -> merge round trips bit-exactly, the file tree, what is dropped,
and bad input as one `error:` line with exit 2 and no output."""

import os
import subprocess
import sys

import pytest
import torch

from megatron.checkpoint import convert as cl
from megatron.checkpoint import protocol
from megatron.checkpoint.layout import split_model
from megatron.training.cli import run_cli
from tests.scripts import REPO, load_script
from tests.unit.checkpoint.test_layout import CONFIGS, make_args, make_model

tool = load_script("tools/checkpoint_util.py")
CONFIG = CONFIGS["swiglu-bias-layernorm-tied-default-ffn"]
ITER = 100


def payload(model, tp=1, pp=1):
    """One rank's file as the trainer writes it, training state included."""
    return {"args": {**make_args(CONFIG), "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                     "lr": 3e-4, "seed": 1234},
            "iteration": ITER, "checkpoint_version": 3.0, "model": model,
            "optimizer": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]},
            "rng_state": {"torch": torch.get_rng_state()}, "opt_param_scheduler": {"num_steps": 800},
            "train_state": {"iteration": ITER, "consumed_train_samples": 800}, "consumed_train_samples": 800,
            "consumed_valid_samples": 16, "random_ltd": {"consumed_layer_tokens": 12345, "current_value": 64}}


def write_source(root, tp, pp, full):
    """A training-layout checkpoint written with explicit paths (not through the code under test's writer)."""
    shards = split_model(full, make_args(CONFIG), tp, pp)
    for (t, p), model in shards.items():
        rank = f"mp_rank_{t:02d}" if pp == 1 else f"mp_rank_{t:02d}_{p:03d}"
        os.makedirs(root / f"iter_{ITER:07d}" / rank)
        torch.save(payload(model, tp, pp), root / f"iter_{ITER:07d}" / rank / "model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITER))
    return root


def convert(capsys, *argv):
    code = run_cli(tool.main, [str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_split_then_merge_round_trip(tmp_path, capsys):
    full = make_model(CONFIG)
    write_source(tmp_path / "src", 1, 1, full)
    code, out, _ = convert(capsys, "--load", tmp_path / "src", "--save", tmp_path / "tp2pp2",
                           "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2)
    assert code == 0
    assert "TP=1 PP=1 -> TP=2 PP=2 (4 files)" in out
    assert f"parameters: {sum(v.numel() for v in full.values()):,}" in out
    assert "dropped (layout-specific): optimizer, rng_state" in out and "--no-load-optim --no-load-rng" in out
    assert tree(tmp_path / "tp2pp2") == ["iter_0000100/mp_rank_00_000/model_optim_rng.pt",
                                         "iter_0000100/mp_rank_00_001/model_optim_rng.pt",
                                         "iter_0000100/mp_rank_01_000/model_optim_rng.pt",
                                         "iter_0000100/mp_rank_01_001/model_optim_rng.pt",
                                         "latest_checkpointed_iteration.txt"]
    shard = torch.load(tmp_path / "tp2pp2/iter_0000100/mp_rank_01_001/model_optim_rng.pt", weights_only=True)
    assert set(shard) == {"args", "iteration", "checkpoint_version", "model", "train_state", "opt_param_scheduler",
                          "consumed_train_samples", "consumed_valid_samples", "random_ltd"}
    assert shard["args"]["tensor_model_parallel_size"] == 2 and shard["args"]["pipeline_model_parallel_size"] == 2
    assert shard["args"]["lr"] == 3e-4 and shard["iteration"] == ITER and shard["random_ltd"]["current_value"] == 64
    # the last stage of a tied model carries its copy of the word embeddings
    assert torch.equal(shard["model"]["output_layer.weight"], full["embedding.word_embeddings.weight"][64:])

    code, out, _ = convert(capsys, "--load", tmp_path / "tp2pp2", "--save", tmp_path / "merged", "--merge")
    assert code == 0 and "TP=2 PP=2 -> TP=1 PP=1 (1 files)" in out
    assert "dropped" not in out  # nothing left to drop
    merged = torch.load(tmp_path / "merged/iter_0000100/mp_rank_00/model_optim_rng.pt", weights_only=True)
    assert list(merged["model"]) == list(full)
    assert all(torch.equal(merged["model"][k], full[k]) for k in full)
    assert merged["args"]["tensor_model_parallel_size"] == 1 and merged["consumed_train_samples"] == 800
    assert (tmp_path / "merged/latest_checkpointed_iteration.txt").read_text() == "100"


def test_training_layout_to_other_layout_and_load_merged(tmp_path, capsys):
    full = make_model(CONFIG, seed=3)
    write_source(tmp_path / "src", 2, 2, full)
    assert convert(capsys, "--load", tmp_path / "src", "--save", tmp_path / "tp4", "--target-tensor-parallel-size",
                   4, "--target-pipeline-parallel-size", 1)[0] == 0
    assert len(os.listdir(tmp_path / "tp4/iter_0000100")) == 4
    ckpt = cl.load_merged_checkpoint(str(tmp_path / "tp4"))
    assert all(torch.equal(ckpt["model"][k], full[k]) for k in full) and set(ckpt["model"]) == set(full)
    assert "optimizer" not in ckpt and ckpt["iteration"] == ITER


def test_vocab_repadded_for_the_target_tp(tmp_path, capsys):
    """A TP=4 run with --make-vocab-size-divisible-by 64 pads 98 ids to 256 rows, a TP=1 run to 128."""
    full = make_model(CONFIG)
    write_source(tmp_path / "src", 1, 1, full)
    for rank_file in (tmp_path / "src").rglob("*.pt"):
        ckpt = torch.load(rank_file, weights_only=True)
        ckpt["args"].update(tokenizer_type="NullTokenizer", vocab_size=97, make_vocab_size_divisible_by=64)
        torch.save(ckpt, rank_file)
    code, out, _ = convert(capsys, "--load", tmp_path / "src", "--save", tmp_path / "tp4",
                           "--target-tensor-parallel-size", 4, "--target-pipeline-parallel-size", 2)
    assert code == 0 and "padded vocabulary: 128 -> 256 rows for TP=4 (tokenizer: 98 ids)" in out
    last = torch.load(tmp_path / "tp4/iter_0000100/mp_rank_03_001/model_optim_rng.pt", weights_only=True)
    assert last["args"]["padded_vocab_size"] == 256
    assert last["model"]["output_layer.weight"].shape == (64, 64) and not last["model"]["output_layer.weight"].any()
    code, out, _ = convert(capsys, "--load", tmp_path / "tp4", "--save", tmp_path / "back", "--merge")
    assert code == 0 and "256 -> 128 rows for TP=1" in out
    merged = cl.load_merged_checkpoint(str(tmp_path / "back"))
    assert all(torch.equal(merged["model"][k], full[k]) for k in full) and merged["args"]["padded_vocab_size"] == 128
    # --true-vocab-size wins over the saved flags
    code, out, _ = convert(capsys, "--load", tmp_path / "src", "--save", tmp_path / "small", "--merge",
                           "--true-vocab-size", "60")
    assert code == 0 and "128 -> 64 rows for TP=1 (tokenizer: 60 ids)" in out
    code, _, err = convert(capsys, "--load", tmp_path / "src", "--save", tmp_path / "big", "--merge",
                           "--true-vocab-size", "130")
    assert code == 2 and "the tokenizer has 130 ids but embedding.word_embeddings.weight only 128 rows" in err
    assert not (tmp_path / "big").exists()


def test_vocab_kept_when_the_tokenizer_is_unknown(tmp_path, capsys):
    write_source(tmp_path / "src", 2, 1, make_model(CONFIG))
    code, out, _ = convert(capsys, "--load", tmp_path / "src", "--save", tmp_path / "out", "--merge")
    assert code == 0 and "padded vocabulary kept at 128 rows" in out and "--true-vocab-size" in out


def test_merged_model_loads_into_gpt_model(tmp_path):
    """The key names and shapes are the real model's."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.config import TransformerConfig

    config = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=8, seq_length=32,
                               vocab_size=128, swiglu=True, hidden_dropout=0.0, attention_dropout=0.0)
    model = GPTModel(config)
    full = make_model(CONFIG, seed=5)
    write_source(tmp_path / "src", 2, 2, full)
    model.load_state_dict(cl.load_merged_checkpoint(str(tmp_path / "src"))["model"], strict=True)


def bad_sources(tmp_path):
    full = make_model(CONFIG)
    return full, write_source(tmp_path / "src", 2, 2, full)


@pytest.mark.parametrize("case, argv, damage, needle", [
    ("missing rank", ["--merge"], lambda r: os.remove(r / "iter_0000100/mp_rank_01_001/model_optim_rng.pt"),
     "mp_rank_01_001/model_optim_rng.pt is missing"),
    ("heads", ["--target-tensor-parallel-size", "3", "--target-pipeline-parallel-size", "1"], None,
     "tensor-parallel size 3 does not divide the model's 8 attention heads"),
    ("layers", ["--target-tensor-parallel-size", "1", "--target-pipeline-parallel-size", "3"], None,
     "pipeline-parallel size 3 does not divide the model's 4 layers"),
    ("no target", [], None, "give --target-tensor-parallel-size"),
    ("merge and target", ["--merge", "--target-tensor-parallel-size", "2"], None, "--merge means"),
    ("no tracker", ["--merge"], lambda r: os.remove(r / "latest_checkpointed_iteration.txt"), "--iteration"),
    ("wrong iteration", ["--merge", "--iteration", "7"], None, "iter_0000007 is missing"),
    ("corrupt file", ["--merge"], lambda r: (r / "iter_0000100/mp_rank_01_000/model_optim_rng.pt").write_bytes(
        b"junk"), "cannot read checkpoint"),
    ("foreign rank", ["--merge"], lambda r: os.makedirs(r / "iter_0000100/mp_rank_02_000"), "beyond its args"),
])
def test_bad_input(tmp_path, capsys, case, argv, damage, needle):
    _, src = bad_sources(tmp_path)
    if damage:
        damage(src)
    code, _, err = convert(capsys, "--load", src, "--save", tmp_path / "out", *argv)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert needle in err
    assert not (tmp_path / "out").exists()


def test_mismatched_shard_shapes(tmp_path, capsys):
    _, src = bad_sources(tmp_path)
    path = src / "iter_0000100/mp_rank_01_000/model_optim_rng.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["model"]["decoder.layers.1.mlp.linear_fc2.weight"] = torch.zeros(64, 3)
    torch.save(ckpt, path)
    code, _, err = convert(capsys, "--load", src, "--save", tmp_path / "out", "--merge")
    assert code == 2 and "mismatched shapes across TP ranks of stage 0 for decoder.layers.1.mlp.linear_fc2" in err
    assert not (tmp_path / "out").exists()


def test_in_place_refused_and_existing_output_untouched_on_error(tmp_path, capsys):
    _, src = bad_sources(tmp_path)
    code, _, err = convert(capsys, "--load", src, "--save", src, "--merge")
    assert code == 2 and "--save must differ" in err
    (tmp_path / "out").mkdir()
    (tmp_path / "out/latest_checkpointed_iteration.txt").write_text("5")
    code, _, _ = convert(capsys, "--load", src, "--save", tmp_path / "out", "--target-tensor-parallel-size", "16",
                         "--target-pipeline-parallel-size", "1")
    assert code == 2 and tree(tmp_path / "out") == ["latest_checkpointed_iteration.txt"]


def test_failed_write_leaves_previous_checkpoint(tmp_path, capsys, monkeypatch):
    _, src = bad_sources(tmp_path)
    assert convert(capsys, "--load", src, "--save", tmp_path / "out", "--merge")[0] == 0
    (tmp_path / "out/latest_checkpointed_iteration.txt").write_text("50")  # pretend it is an older one
    os.rename(tmp_path / "out/iter_0000100", tmp_path / "out/iter_0000050")
    calls, real_save = [], torch.save

    def flaky_save(obj, path):  # the third of four rank files fails
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        real_save(obj, path)

    monkeypatch.setattr(torch, "save", flaky_save)
    code, _, err = convert(capsys, "--load", src, "--save", tmp_path / "out", "--target-tensor-parallel-size", 2,
                           "--target-pipeline-parallel-size", 2)
    assert code == 2 and err.strip().splitlines() == [
        f"error: cannot convert {src} to {tmp_path / 'out'}: disk full; no partial checkpoint was left in "
        f"{tmp_path / 'out'}"], err
    assert tree(tmp_path / "out") == ["iter_0000050/mp_rank_00/model_optim_rng.pt", "latest_checkpointed_iteration.txt"]
    assert (tmp_path / "out/latest_checkpointed_iteration.txt").read_text() == "50"
    calls.clear()  # into a folder that did not exist: it is removed again
    code, _, err = convert(capsys, "--load", src, "--save", tmp_path / "new", "--target-tensor-parallel-size", 2,
                           "--target-pipeline-parallel-size", 2)
    assert code == 2 and len(err.strip().splitlines()) == 1 and not (tmp_path / "new").exists()


def test_subprocess_exit_code_and_one_line(tmp_path):
    argv = [sys.executable, str(REPO / "tools/checkpoint_util.py"), "--load", str(tmp_path / "none"),
            "--save", str(tmp_path / "out"), "--merge"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no checkpoint in") and "Traceback" not in proc.stderr


# ---- crash safety: the trainer's save protocol ---------------------------------------------------------
class Crash(BaseException):
    """A kill -9 at that instant: nothing after it runs, not even except-clauses for Exception."""


def _same_model(a, b):
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("where", ["third rank file", "rename into place", "tracker"])
def test_resave_killed_midway_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch, where):
    """Re-converting into a folder that already holds the same iteration, killed at three moments: the
    previous checkpoint stays loadable (the old writer deleted `iter_X` before renaming the new one in),
    and the next conversion cleans up and succeeds."""
    full, src = bad_sources(tmp_path)
    out = tmp_path / "out"
    assert convert(capsys, "--load", src, "--save", out, "--merge")[0] == 0
    previous = protocol.load_checkpoint(str(out))["model"]
    real_save, real_replace, calls = torch.save, os.replace, []

    def killing_save(obj, f):
        calls.append(f)
        if where == "third rank file" and len(calls) == 3:
            raise Crash
        real_save(obj, f)

    def killing_replace(a, b):
        a, b = str(a), str(b)
        if (where == "rename into place" and a.endswith(".tmp") and b == str(out / "iter_0000100")) or \
                (where == "tracker" and b.endswith(cl.TRACKER)):
            raise Crash
        real_replace(a, b)

    monkeypatch.setattr(torch, "save", killing_save)
    monkeypatch.setattr(os, "replace", killing_replace)
    with pytest.raises(Crash):
        tool.main(["--load", str(src), "--save", str(out), "--target-tensor-parallel-size", "2",
                   "--target-pipeline-parallel-size", "2"])
    monkeypatch.undo()
    # what a reader finds right after the kill: a complete iteration 100; before the new folder is renamed
    # in, the previous one (one unsharded file, possibly still named iter_X.old), after it the new one
    assert (out / cl.TRACKER).read_text() == "100"
    if where != "tracker":
        assert _same_model(protocol.load_checkpoint(str(out))["model"], previous)
    assert _same_model(cl.load_merged_checkpoint(str(out))["model"], full)
    code, text, _ = convert(capsys, "--load", src, "--save", out, "--target-tensor-parallel-size", 2,
                            "--target-pipeline-parallel-size", 2)
    assert code == 0 and tree(out) == ["iter_0000100/mp_rank_00_000/model_optim_rng.pt",
                                       "iter_0000100/mp_rank_00_001/model_optim_rng.pt",
                                       "iter_0000100/mp_rank_01_000/model_optim_rng.pt",
                                       "iter_0000100/mp_rank_01_001/model_optim_rng.pt",
                                       "latest_checkpointed_iteration.txt"], text
    assert _same_model(cl.load_merged_checkpoint(str(out))["model"], full)


# ---- BERT ----------------------------------------------------------------------------------------------
def bert_source(root, binary_head: bool, untie: bool, seed=0):
    """A TP=1 PP=1 BERT checkpoint: the real BertModel's names and shapes, random values everywhere."""
    from megatron.core.models.bert import BertModel
    from tasks.checkpoint import bert_config

    args = {**make_args(CONFIG), "model_type": "bert", "bert_binary_head": binary_head, "seq_length": 32,
            "make_vocab_size_divisible_by": 64, "untie_embeddings_and_output_weights": untie}
    model = BertModel(bert_config(args), add_binary_head=binary_head)
    g = torch.Generator().manual_seed(seed)
    full = {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    os.makedirs(root / f"iter_{ITER:07d}/mp_rank_00")
    torch.save({"args": args, "iteration": ITER, "checkpoint_version": 3.0, "model": full},
               root / f"iter_{ITER:07d}/mp_rank_00/model_optim_rng.pt")
    (root / "latest_checkpointed_iteration.txt").write_text(str(ITER))
    return model, full


@pytest.mark.parametrize("binary_head, untie", [(True, False), (False, True)], ids=["sop-tied", "nosop-untied"])
def test_bert_split_merge_round_trip(tmp_path, capsys, binary_head, untie):
    from tasks.checkpoint import load_pretrained_bert

    model, full = bert_source(tmp_path / "src", binary_head, untie)
    code, out, _ = convert(capsys, "--load", tmp_path / "src", "--save", tmp_path / "tp2pp2",
                           "--target-tensor-parallel-size", 2, "--target-pipeline-parallel-size", 2)
    assert code == 0 and "TP=1 PP=1 -> TP=2 PP=2 (4 files)" in out
    first = torch.load(tmp_path / "tp2pp2/iter_0000100/mp_rank_01_000/model_optim_rng.pt", weights_only=True)["model"]
    last = torch.load(tmp_path / "tp2pp2/iter_0000100/mp_rank_01_001/model_optim_rng.pt", weights_only=True)["model"]
    # TP rank 1's shards, sliced by hand: vocab-parallel rows and bias, replicated heads and token types
    assert torch.equal(first["embedding.word_embeddings.weight"], full["embedding.word_embeddings.weight"][64:])
    assert torch.equal(last["output_layer.bias"], full["output_layer.bias"][64:])
    assert torch.equal(last["output_layer.weight"], full["output_layer.weight" if untie else
                                                         "embedding.word_embeddings.weight"][64:])
    for key in ("lm_head.dense.weight", "lm_head.layer_norm.bias") + (
            ("pooler.dense.weight", "binary_head.bias") if binary_head else ()):
        assert torch.equal(last[key], full[key]), key
    assert ("embedding.tokentype_embeddings.weight" in first) == binary_head
    assert "encoder.layers.1.mlp.linear_fc2.weight" in last and "encoder.layers.2.input_layernorm.weight" not in last
    if binary_head:
        key = "embedding.tokentype_embeddings.weight"
        assert torch.equal(first[key], full[key])
    # the fine-tuning loader merges by the model's own partition tags, an independent path
    independent = load_pretrained_bert(str(tmp_path / "tp2pp2")).state
    assert set(independent) == set(full) and all(torch.equal(independent[k], full[k]) for k in full)
    code, out, _ = convert(capsys, "--load", tmp_path / "tp2pp2", "--save", tmp_path / "merged", "--merge")
    assert code == 0
    merged = cl.load_merged_checkpoint(str(tmp_path / "merged"))["model"]
    assert _same_model(merged, full)  # bit for bit, in the model's own order
    model.load_state_dict(merged, strict=True)


def test_bert_vocab_repad_covers_the_output_bias(tmp_path):
    _, full = bert_source(tmp_path / "src", True, False)
    cl.convert_checkpoint(str(tmp_path / "src"), str(tmp_path / "tp4"), 4, 1, true_vocab_size=98)  # 128 -> 256 rows
    ckpt = cl.load_merged_checkpoint(str(tmp_path / "tp4"))
    bias = ckpt["model"]["output_layer.bias"]
    assert bias.shape == (256,) and torch.equal(bias[:128], full["output_layer.bias"]) and not bias[128:].any()
