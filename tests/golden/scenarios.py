"""Golden runs: what the seams refactor (issue 11) must not change, recorded from the code before it.

    python -m tests.golden.scenarios record --repo /path/to/checkout-before-the-change

records into `tests/golden/golden.json` (and the checkpoint fixture `tests/golden/pre_seams_checkpoint/`),
running the given checkout's own scripts; `tests/golden/test_golden.py` runs the same scenarios on this
checkout and asserts every number bit for bit:

- quickstart: examples/quickstart_cpu.sh as a user runs it, stopped after 50 iterations
  (`--exit-interval 50`): the sha256 of the `.bin/.idx` it writes, and per iteration the loss, gradient
  norm, LR and r_t; the validation loss at iteration 50.
- tp2pp2: a tiny random-LTD GPT with dropout on, TP=2 x PP=2 under torchrun (4 gloo ranks), 10 iterations.
- resume: a tiny random-LTD GPT with dropout on, 8 iterations in one process; the checkpoint the old code
  saved at iteration 4 is kept as a fixture, and the new code resumed from it must log iterations 5-8 of
  the uninterrupted old run.
"""

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "golden.json")
FIXTURE = os.path.join(HERE, "pre_seams_checkpoint")
KEYS = ("lm_loss", "grad_norm", "lr", "kept_length", "consumed_layer_tokens")

TINY = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3", "--min-lr", "1e-4",
        "--lr-decay-style", "cosine", "--lr-warmup-iters", "2", "--tokenizer-type", "NullTokenizer",
        "--vocab-size", "97", "--num-workers", "0", "--log-interval", "1", "--seed", "7",
        "--hidden-dropout", "0.1", "--attention-dropout", "0.1",
        "--random-ltd", "--random-ltd-start-seq-length", "8", "--random-ltd-seq-step", "4",
        "--random-ltd-ramp-iters", "8"]
TP2PP2 = TINY + ["--train-iters", "10", "--eval-interval", "5", "--eval-iters", "1", "--split", "90,10,0",
                 "--make-vocab-size-divisible-by", "64", "--global-batch-size", "8", "--distributed-backend", "gloo",
                 "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
RESUME = TINY + ["--mock-data", "--train-iters", "8", "--eval-interval", "100", "--eval-iters", "0",
                 "--save-interval", "4"]


def _records(path):
    with open(path) as f:
        recs = [json.loads(line) for line in f if line.strip()]
    train = [{"iteration": r["iteration"], **{k: r[k] for k in KEYS}} for r in recs if "lm_loss" in r]
    val = [{"iteration": r["iteration"], "val_loss": r["val_loss"]} for r in recs if "val_loss" in r]
    return {"train": train, "validation": val}


def _sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _run(cmd, repo, env=None, timeout=900):
    env = {**os.environ, "PYTHONPATH": repo, **(env or {})}
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def quickstart(repo, work):
    out = os.path.join(work, "qs")
    _run(["bash", "examples/quickstart_cpu.sh"], repo,
         {"OUT": out, "PYTHON": sys.executable, "LOG_INTERVAL": "1", "EXTRA_ARGS": "--exit-interval 50"})
    data = {name: _sha256(os.path.join(out, "data", name)) for name in ("corpus_text_document.bin",
                                                                          "corpus_text_document.idx")}
    return {"data_sha256": data, **_records(os.path.join(out, "metrics.jsonl"))}


def make_pattern_data(directory):
    """The learnable corpus of tests/functional/gpt_cli.py (its bytes are pinned by the quickstart's sha256
    and the megatron-core oracle tests, so it is the same input before and after)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
    from tests.functional.gpt_cli import make_pattern_data as make

    return make(directory)


def tp2pp2(repo, work):
    prefix = make_pattern_data(work)
    log = os.path.join(work, "tp2pp2.jsonl")
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    _run([torchrun, "--standalone", "--nproc_per_node=4", "pretrain_gpt_ltd.py", *TP2PP2, "--data-path", prefix,
          "--log-json", log], repo, {"MASTER_ADDR": "127.0.0.1", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"})
    return _records(log)


def resume_straight(repo, work):
    """The uninterrupted old run, and its checkpoint of iteration 4 (copied out as the fixture)."""
    log, save = os.path.join(work, "straight.jsonl"), os.path.join(work, "ckpt")
    _run([sys.executable, "pretrain_gpt_ltd.py", *RESUME, "--save", save, "--log-json", log], repo)
    return _records(log), save


def record(repo):
    with tempfile.TemporaryDirectory() as work:
        golden = {"quickstart": quickstart(repo, work), "tp2pp2": tp2pp2(repo, work)}
        golden["resume"], save = resume_straight(repo, work)
        shutil.rmtree(FIXTURE, ignore_errors=True)
        shutil.copytree(os.path.join(save, "iter_0000004"), os.path.join(FIXTURE, "iter_0000004"))
        with open(os.path.join(FIXTURE, "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("4")
    with open(GOLDEN, "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("command", choices=["record"])
    p.add_argument("--repo", required=True, help="the checkout to record from")
    record(os.path.abspath(p.parse_args().repo))
