"""Under torchrun with 4 CPU ranks: the 1.3B recipe shrunk by its environment (TP=2, PP=2), and bad
parallel configurations failing on every rank with one clear message, without a hang.

torchrun stops the other workers as soon as one exits with an error, so its output cannot show that
every rank reached the message. The per-rank check therefore runs the same entry point on 4 forked gloo
ranks (`run_distributed`), each recording its own exit code and stderr, with a deadline that turns a rank
stuck in a collective into a failure; one case also goes through the real torchrun end to end.
"""

import contextlib
import io
import json
import os
import subprocess
import sys

import pytest

from tests.distributed.launcher import GLOO, run_distributed
from tests.functional.gpt_cli import REPO, TINY, run_inprocess
from tests.functional.test_recipes import run_recipe

BAD_CONFIGS = [
    (["--tensor-model-parallel-size", "3"], "world size 4 is not divisible by tensor x pipeline parallel size 3 x 1"),
    (["--tensor-model-parallel-size", "4", "--hidden-size", "48", "--num-attention-heads", "6"],
     "--num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4"),
    (["--pipeline-model-parallel-size", "4", "--num-layers", "6"],
     "--num-layers 6 is not divisible by --pipeline-model-parallel-size 4"),
    (["--global-batch-size", "6", "--micro-batch-size", "2"], "data-parallel size 4"),
]


def torchrun(argv, nproc=4, timeout=120):
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [os.path.join(os.path.dirname(sys.executable), "torchrun"), "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(REPO, "pretrain_gpt_ltd.py"), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def test_ltd_recipe_runs_with_tp2_pp2(tmp_path):
    proc, recs = run_recipe("pretrain_gpt_1.3b_ltd.sh", tmp_path, GPUS_PER_NODE="4", TP="2", PP="2",
                            LTD_START="8", LTD_STEP="4", LTD_RAMP_ITERS="6", TRAIN_LAYER_TOKENS="2500",
                            OMP_NUM_THREADS="1", EXTRA_ARGS=" ".join(["--num-workers", "0"] + GLOO))
    assert "tensor x pipeline x data parallel = 2 x 2 x 1" in proc.stdout
    assert proc.stdout.count("validation loss at iteration 5 on validation set") == 1  # printed once
    lt = [r["consumed_layer_tokens"] for r in recs]
    assert lt[-1] >= 2500 > lt[-2]
    ckpt = tmp_path / "run" / "checkpoints" / f"iter_{len(recs):07d}"
    assert sorted(p.name for p in (ckpt / "rng").iterdir()) == ["mp_rank_00_000.json", "mp_rank_00_001.json",
                                                                "mp_rank_01_000.json", "mp_rank_01_001.json"]


def _train_and_record(rank, world, argv, out_dir):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run_inprocess(argv)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"code": code, "stderr": err.getvalue()}, f)


@pytest.mark.parametrize("flags, needle", BAD_CONFIGS)
def test_bad_parallel_config_fails_on_every_rank(tmp_path, flags, needle):
    argv = TINY + GLOO + ["--train-iters", "3", "--save", str(tmp_path / "ck")] + flags
    run_distributed(_train_and_record, world_size=4, args=(argv, str(tmp_path)), hang_after_s=120)
    for rank in range(4):
        rec = json.loads((tmp_path / f"rank{rank}.json").read_text())
        errors = [line for line in rec["stderr"].splitlines() if line.startswith("error: ")]
        assert rec["code"] == 2 and len(errors) == 1 and needle in errors[0], (rank, rec)
        assert "Traceback" not in rec["stderr"], (rank, rec["stderr"][-2000:])
    assert not (tmp_path / "ck").exists()


def test_bad_parallel_config_under_torchrun(tmp_path):
    """The real launcher: non-zero exit, only our one-line message (from however many ranks torchrun let
    print before stopping the rest), no traceback of ours, nothing written."""
    flags, needle = BAD_CONFIGS[0]
    proc = torchrun(TINY + GLOO + ["--train-iters", "3", "--save", str(tmp_path / "ck")] + flags)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors and all(needle in line for line in errors), proc.stderr[-3000:]
    # torchrun reports the failed workers with its own traceback; ours must print none
    assert f'File "{REPO}/megatron' not in proc.stderr and "pretrain_gpt_ltd.py\", line" not in proc.stderr
    assert not (tmp_path / "ck").exists()
