"""A GPT checkpoint written by Megatron-LM (legacy `torch` format, megatron-core's TransformerEngine names,
argparse.Namespace args) loads in every reader, at TP = 1 and at TP = 2 x PP = 2: the trainer's
`--load --finetune` (training continues exactly as from the same weights in our format), the evaluation
reader (logits equal Megatron's forward written out in tests/unit/checkpoint/megatron_lm_files.py), the
Hugging Face export and tools/checkpoint_util.py (any layout in, any out, our format). A file with a payload
that would run code, and a MoE checkpoint, are refused in one line with nothing written."""

import argparse
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron.checkpoint.layout import split_model
from megatron.checkpoint.protocol import save_checkpoint
from megatron.core.errors import UserError
from megatron.evaluation.checkpoint_model import load_gpt_checkpoint
from megatron.training.cli import run_cli
from tests.distributed.launcher import GLOO, run_distributed
from tests.functional.gpt_cli import TINY, run_inprocess, train_records
from tests.scripts import load_script
from tests.unit.checkpoint import megatron_lm_files as m

checkpoint_util = load_script("tools/checkpoint_util.py")
FLAGS = {  # this project's flags for the models of m.CONFIGS
    "llama": ["--position-embedding-type", "rope", "--normalization", "RMSNorm", "--swiglu",
              "--untie-embeddings-and-output-weights", "--disable-bias-linear", "--group-query-attention",
              "--num-query-groups", "2"],
    "gpt2": ["--openai-gelu"],  # Megatron's fused bias-GELU is the tanh approximation
}
RUN = TINY + ["--make-vocab-size-divisible-by", "64", "--hidden-dropout", "0", "--attention-dropout", "0",
              "--train-iters", "3", "--eval-iters", "0"]
TOKENS = torch.randint(0, m.VOCAB + 1, (2, m.S), generator=torch.Generator().manual_seed(3))


def losses(path):
    return [(r["iteration"], r["lm_loss"]) for r in train_records(path)]


def tool(capsys, *argv):
    code = run_cli(checkpoint_util.main, [str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def refused(code, err, needle):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err


def assert_same_logits(load, full, config):
    with torch.no_grad():
        ours = load_gpt_checkpoint(str(load)).model(TOKENS)
    torch.testing.assert_close(ours, m.reference_logits(full, config, TOKENS), atol=1e-4, rtol=1e-4)  # fp32 vs fp64


def test_tp1_in_the_trainer_the_reader_and_the_hf_export(tmp_path, capsys):
    c = m.CONFIGS["llama"]  # RoPE, RMSNorm, SwiGLU, untied, no biases, GQA with 2 groups
    full = m.make_weights(c)
    meg = m.write_megatron_lm(tmp_path / "megatron", full, c)
    assert_same_logits(meg, full, c)

    # the trainer: the same run as from the same weights saved by this project; not a fresh model's
    ours = tmp_path / "ours"
    save_checkpoint(str(ours), m.ITER, {"args": {**m.our_args(c), "tokenizer_type": "NullTokenizer",
                                                 "vocab_size": m.VOCAB}, "model": full})
    run = RUN + FLAGS["llama"]
    for name, load in (("megatron", ["--load", str(meg), "--finetune"]), ("ours", ["--load", str(ours), "--finetune"]),
                       ("fresh", [])):
        assert run_inprocess(run + load + ["--log-json", str(tmp_path / f"{name}.jsonl")]) == 0
    assert "loaded weights from" in capsys.readouterr().out
    imported, same, fresh = (losses(tmp_path / f"{n}.jsonl") for n in ("megatron", "ours", "fresh"))
    assert [i for i, _ in imported] == [1, 2, 3] and imported == same
    assert all(abs(a - b) > 1e-3 for (_, a), (_, b) in zip(imported, fresh))

    # without --finetune: only the weights are read, so the optimizer and RNG states must be waived
    assert run_inprocess(run + ["--load", str(meg)]) == 2
    refused(2, capsys.readouterr().err, f"checkpoint iteration 100 in {meg} was written by Megatron-LM: only its "
                                         "weights are read (not its optimizer or RNG states); add --finetune")
    assert run_inprocess(run + ["--load", str(meg), "--no-load-optim", "--no-load-rng", "--train-iters", "102",
                                "--log-json", str(tmp_path / "continued.jsonl")]) == 0
    assert [i for i, _ in losses(tmp_path / "continued.jsonl")] == [101, 102]
    assert "consumed samples:          404" in capsys.readouterr().out  # Megatron's 400, then one batch of 4

    # the Hugging Face export reads it like the evaluation tools: Llama with 2 key/value heads
    hf = tmp_path / "hf"
    export = load_script("tools/convert_checkpoint_to_hf.py").main
    assert run_cli(export, ["--load", str(meg), "--output-dir", str(hf)]) == 0
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    assert model.config.num_key_value_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, m.reference_logits(full, c, TOKENS), atol=1e-4, rtol=1e-4)


def _train(rank, world, argv):
    assert run_inprocess(argv) == 0


def test_tp2pp2_in_the_reader_the_trainer_and_checkpoint_util(tmp_path, capsys):
    c = m.CONFIGS["gpt2"]  # learned positions, LayerNorm, GELU, biases, tied (the last stage holds a copy)
    full = m.make_weights(c)
    meg = m.write_megatron_lm(tmp_path / "megatron", full, c, tp=2, pp=2)
    assert_same_logits(meg, full, c)

    # checkpoint_util: any layout out, in our format, bit for bit
    code, out, _ = tool(capsys, "--load", meg, "--save", tmp_path / "merged", "--merge")
    assert code == 0 and "TP=2 PP=2 -> TP=1 PP=1 (1 files)" in out
    assert "read a Megatron-LM checkpoint: parameter names mapped to ours, 40 _extra_state entries dropped" in out
    assert ("dropped (layout-specific): num_floating_point_operations_so_far, opt_param_scheduler, optimizer, "
            "rng_state; continue training from it with --no-load-optim --no-load-rng, or --finetune") in out
    merged = torch.load(tmp_path / "merged/iter_0000100/mp_rank_00/model_optim_rng.pt", weights_only=True)
    assert isinstance(merged["args"], dict) and merged["iteration"] == m.ITER
    assert list(merged["model"]) == list(full) and all(torch.equal(merged["model"][k], full[k]) for k in full)
    assert merged["train_state"] == {"iteration": m.ITER, "consumed_train_samples": 400, "consumed_valid_samples": 40}
    assert tool(capsys, "--load", meg, "--save", tmp_path / "pp2", "--target-tensor-parallel-size", 1,
                "--target-pipeline-parallel-size", 2)[0] == 0
    for (t, p), want in split_model(full, m.our_args(c), 1, 2).items():
        got = torch.load(tmp_path / f"pp2/iter_0000100/mp_rank_{t:02d}_{p:03d}/model_optim_rng.pt", weights_only=True)
        assert list(got["model"]) == list(want) and all(torch.equal(got["model"][k], want[k]) for k in want)
    code, out, _ = tool(capsys, "--load", meg, "--save", tmp_path / "tp4", "--target-tensor-parallel-size", 4,
                        "--target-pipeline-parallel-size", 1)
    assert code == 0 and "padded vocabulary: 128 -> 256 rows for TP=4 (tokenizer: 98 ids)" in out
    assert tool(capsys, "--load", tmp_path / "tp4", "--save", tmp_path / "back", "--merge")[0] == 0
    back = torch.load(tmp_path / "back/iter_0000100/mp_rank_00/model_optim_rng.pt", weights_only=True)["model"]
    assert all(torch.equal(back[k], full[k]) for k in full)

    # the trainer at TP=2 x PP=2 (4 ranks) from Megatron's files; at TP=1 from the merged ones: the same run
    run = RUN + FLAGS["gpt2"] + ["--finetune", "--log-json"]
    layout = ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"] + GLOO
    run_distributed(_train, world_size=4, args=(run + [str(tmp_path / "tp2pp2.jsonl"), "--load", str(meg)] + layout,),
                    hang_after_s=180)
    assert run_inprocess(run + [str(tmp_path / "tp1.jsonl"), "--load", str(tmp_path / "merged")]) == 0
    assert run_inprocess(RUN + FLAGS["gpt2"] + ["--log-json", str(tmp_path / "fresh.jsonl")]) == 0
    parallel, single = losses(tmp_path / "tp2pp2.jsonl"), losses(tmp_path / "tp1.jsonl")
    assert [i for i, _ in parallel] == [1, 2, 3]
    for (_, a), (_, b), (_, fresh) in zip(parallel, single, losses(tmp_path / "fresh.jsonl")):
        assert abs(a - b) <= 1e-5 * abs(b) and abs(a - fresh) > 1e-3, (parallel, single)  # loaded, not initialized


def test_megatron_deepspeed_legacy_names(tmp_path, capsys):
    """The legacy model (Megatron-DeepSpeed, Megatron-LM before megatron-core): nested dicts of its own names,
    a PositionEmbeddingType enum in args, no TransformerEngine."""
    c = m.CONFIGS["gpt2"]
    full = m.make_weights(c, seed=5)
    args = m.namespace(c, tp=2, position_embedding_type=m.PositionEmbeddingType.absolute, add_bias_linear=None,
                       transformer_impl=None, layernorm_epsilon=None, norm_epsilon=None)
    meg = m.write_megatron_lm(tmp_path / "deepspeed", full, c, tp=2, names=m.legacy_names, args=args)
    assert_same_logits(meg, full, c)
    code, out, _ = tool(capsys, "--load", meg, "--save", tmp_path / "merged", "--merge")
    assert code == 0 and "0 _extra_state entries dropped" in out
    merged = torch.load(tmp_path / "merged/iter_0000100/mp_rank_00/model_optim_rng.pt", weights_only=True)["model"]
    assert list(merged) == list(full) and all(torch.equal(merged[k], full[k]) for k in full)


class Payload:
    """What an attacker pickles: unpickling calls os.system (a shell command that leaves a marker)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def with_payload(marker, tp_rank=0):
    """An edit for write_megatron_lm: the payload as the first of rank `tp_rank`'s args."""
    def edit(t, p, payload):
        if t == tp_rank:
            payload["args"] = argparse.Namespace(data_cache_path=Payload(marker), **vars(payload["args"]))
    return edit


def test_a_payload_that_would_run_code_is_refused_unrun(tmp_path, capsys):
    c, marker = m.CONFIGS["gpt2"], tmp_path / "payload_ran"
    meg = m.write_megatron_lm(tmp_path / "tp2", m.make_weights(c), c, tp=2, edit=with_payload(marker, tp_rank=1))
    rank1 = meg / "iter_0000100/mp_rank_01/model_optim_rng.pt"
    needle = f"refused checkpoint {rank1}: it holds a pickled Python object (posix.system), which is never run"
    refused(*tool(capsys, "--load", meg, "--save", tmp_path / "out", "--merge")[::2], needle)
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError, match=r"^refused checkpoint .*mp_rank_01.*\(posix\.system\), which is never run"):
        load_gpt_checkpoint(str(meg))
    tp1 = m.write_megatron_lm(tmp_path / "tp1", m.make_weights(c), c, edit=with_payload(marker))
    assert run_inprocess(RUN + FLAGS["gpt2"] + ["--load", str(tp1), "--finetune"]) == 2
    refused(2, capsys.readouterr().err, "it holds a pickled Python object (posix.system), which is never run")
    assert not marker.exists()
    # the payload is live: a full unpickle (in a child process) runs it before failing on Megatron's enums
    unsafe = "import sys, torch; torch.load(sys.argv[1], weights_only=False)"
    subprocess.run([sys.executable, "-c", unsafe, str(tp1 / "iter_0000100/mp_rank_00/model_optim_rng.pt")],
                   timeout=120, capture_output=True)
    assert marker.exists()


def test_a_moe_checkpoint_is_refused_and_nothing_written(tmp_path, capsys):
    c = m.CONFIGS["llama"]
    args = m.namespace(c, num_experts=8, moe_router_topk=2)

    def experts(t, p, payload):  # what megatron-core's MoE layer saves instead of mlp.linear_fc1/fc2
        model = payload["model"]
        for name in [n for n in model if ".mlp.linear_fc" in n]:
            weight = model.pop(name)
            if torch.is_tensor(weight):
                model[name.replace(".mlp.", ".mlp.experts.local_experts.0.")] = weight
        model["decoder.layers.0.mlp.router.weight"] = torch.zeros(8, m.H)

    meg = m.write_megatron_lm(tmp_path / "moe", m.make_weights(c), c, args=args, edit=experts)
    needle = "it uses mixture of experts (--num-experts 8), which this project's GPT does not have"
    refused(*tool(capsys, "--load", meg, "--save", tmp_path / "out", "--merge")[::2], needle)
    assert not (tmp_path / "out").exists()
    run = RUN + FLAGS["llama"] + ["--load", str(meg), "--finetune", "--save", str(tmp_path / "run")]
    assert run_inprocess(run) == 2
    refused(2, capsys.readouterr().err, needle)
    assert not (tmp_path / "run").exists()
    hf = load_script("tools/convert_checkpoint_to_hf.py").main
    code = run_cli(hf, ["--load", str(meg), "--output-dir", str(tmp_path / "hf")])
    refused(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "hf").exists()
