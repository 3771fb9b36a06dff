"""The 1.3B recipes are the very scripts users launch; here they run through torchrun on CPU, shrunk."""

import json
import os
import re
import socket
import subprocess
import sys

from tests.functional.gpt_cli import REPO, make_pattern_data, train_records

TINY_ENV = dict(NUM_LAYERS="4", HIDDEN="32", HEADS="4", SEQ="32", GLOBAL_BATCH="4", MICRO_BATCH="2",
                GPUS_PER_NODE="1", PRECISION="", WARMUP_TOKENS="256", LOG_INTERVAL="1", EVAL_INTERVAL="5",
                EVAL_ITERS="1", SAVE_INTERVAL="100", TOKENIZER_ARGS="--tokenizer-type NullTokenizer --vocab-size 97",
                EXTRA_ARGS="--num-workers 0 --distributed-backend gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_recipe(script, tmp_path, **env):
    full = {**os.environ, **TINY_ENV, "DATA_PATH": make_pattern_data(tmp_path, num_docs=2000), "OUT": str(tmp_path / "run"),
            "MASTER_PORT": str(free_port()), "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", **env}
    full["PATH"] = os.path.dirname(sys.executable) + os.pathsep + full.get("PATH", "")  # torchrun of this venv
    full.pop("WORLD_SIZE", None)
    full = {k: v for k, v in full.items() if v is not None}  # None: leave the recipe's default
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", script)], env=full, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, train_records(tmp_path / "run" / "metrics.jsonl")


def test_ltd_recipe_stops_at_layer_token_budget(tmp_path):
    # Dense would be 4 layers x 32 x 4 samples = 512 layer-tokens per iteration; budget 2500.
    proc, recs = run_recipe("pretrain_gpt_1.3b_ltd.sh", tmp_path, LTD_START="8", LTD_STEP="4",
                            LTD_RAMP_ITERS="6", TRAIN_LAYER_TOKENS="2500")
    assert "kept length:" in proc.stdout
    # PRECISION="" means no precision flag (fp32 on CPU), not the recipe's default --bf16: the banner says so
    assert re.search(r"^  bf16 \.+ False$", proc.stdout, re.M), proc.stdout[:3000]
    lt = [r["consumed_layer_tokens"] for r in recs]
    assert lt[-1] >= 2500 > lt[-2]  # stopped after the first iteration reaching the budget
    # MSLG: r_t = min(s, q * floor((r0 + t / T * (s - r0)) / q)), r0 = 8, q = 4, T = 6, s = 32
    assert [r["kept_length"] for r in recs] == [min(32, 4 * ((8 * 6 + t * 24) // 24)) for t in range(len(recs))]
    assert (tmp_path / "run" / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == str(len(recs))


def test_baseline_recipe_reads_its_token_budget(tmp_path):
    proc, recs = run_recipe("pretrain_gpt_1.3b_baseline.sh", tmp_path, TRAIN_TOKENS="1024")
    assert re.search(r"^  bf16 \.+ False$", proc.stdout, re.M)
    assert len(recs) == 8  # 1024 tokens / (4 samples x 32 tokens)
    assert all(r["kept_length"] == 32 for r in recs)
    assert recs[-1]["consumed_layer_tokens"] == 8 * 4 * 4 * 32


def test_recipe_defaults_to_bf16_with_the_distributed_optimizer(tmp_path):
    """Unset PRECISION and DIST_OPT: bf16 parameters and ZeRO-1 with overlapped reduce and gather, as
    Megatron's GPT-3 examples; here on two gloo ranks, so the optimizer state really is sharded."""
    proc, recs = run_recipe("pretrain_gpt_1.3b_baseline.sh", tmp_path, PRECISION=None, GPUS_PER_NODE="2",
                            TRAIN_TOKENS="1024")
    for flag in ("bf16", "use_distributed_optimizer", "overlap_grad_reduce", "overlap_param_gather"):
        assert re.search(rf"^  {flag} \.+ True$", proc.stdout, re.M), flag
    assert len(recs) == 8 and recs[-1]["lm_loss"] < recs[0]["lm_loss"]
    folder = tmp_path / "run" / "checkpoints" / "iter_0000008"  # torch_dist, Megatron's default format
    assert sorted(p.name for p in folder.glob("__*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert json.loads((folder / "common.json").read_text())["optimizer"]["distributed"] is True


def test_recipe_refuses_an_unknown_precision(tmp_path):
    full = {**os.environ, **TINY_ENV, "PRECISION": "fp8", "LAUNCH": "echo"}
    proc = subprocess.run(["bash", os.path.join(REPO, "examples", "pretrain_gpt_1.3b_ltd.sh")], env=full,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: PRECISION must be bf16, fp16 or fp32, got 'fp8'"
