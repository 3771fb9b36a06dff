"""Under torchrun with 4 CPU ranks: the 1.3B recipe shrunk by its environment (TP=2, PP=2), and bad
parallel configurations failing on every rank with one clear message, without a hang."""

import os
import subprocess
import sys

import pytest

from tests.functional.gpt_cli import REPO, TINY
from tests.functional.test_recipes import run_recipe


def torchrun(argv, nproc=4, timeout=120):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(REPO, "pretrain_gpt_ltd.py"), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def test_ltd_recipe_runs_with_tp2_pp2(tmp_path):
    proc, recs = run_recipe("pretrain_gpt_1.3b_ltd.sh", tmp_path, GPUS_PER_NODE="4", TP="2", PP="2",
                            LTD_START="8", LTD_STEP="4", LTD_RAMP_ITERS="6", TRAIN_LAYER_TOKENS="2500",
                            OMP_NUM_THREADS="1")
    assert "tensor x pipeline x data parallel = 2 x 2 x 1" in proc.stdout
    assert proc.stdout.count("validation loss at iteration 5 on validation set") == 1  # printed once
    lt = [r["consumed_layer_tokens"] for r in recs]
    assert lt[-1] >= 2500 > lt[-2]
    ckpt = tmp_path / "run" / "checkpoints" / f"iter_{len(recs):07d}"
    assert sorted(p.name for p in ckpt.iterdir()) == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000",
                                                      "mp_rank_01_001"]


@pytest.mark.parametrize("flags, needle", [
    (["--tensor-model-parallel-size", "3"], "world size 4 is not divisible by tensor x pipeline parallel size 3 x 1"),
    (["--tensor-model-parallel-size", "4", "--hidden-size", "48", "--num-attention-heads", "6"],
     "--num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4"),
    (["--pipeline-model-parallel-size", "4", "--num-layers", "6"],
     "--num-layers 6 is not divisible by --pipeline-model-parallel-size 4"),
    (["--global-batch-size", "6", "--micro-batch-size", "2"], "data-parallel size 4"),
])
def test_bad_parallel_config_fails_on_every_rank(tmp_path, flags, needle):
    argv = TINY + ["--train-iters", "2", "--save", str(tmp_path / "ck")] + flags
    proc = torchrun(argv)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(needle in line for line in errors), proc.stderr[-3000:]
    # torchrun reports the failed workers with its own traceback; ours must print none
    assert f'File "{REPO}/megatron' not in proc.stderr and "pretrain_gpt_ltd.py\", line" not in proc.stderr
    assert not (tmp_path / "ck").exists()
