"""Kill a training run at random moments while it saves torch_dist checkpoints asynchronously.

    python tests/reliability/kill_async_saves.py ROOT TRIALS SEED

Prints one JSON summary line. Each trial forks a child that trains a tiny GPT with `--async-save
--save-interval 1` (a background write in flight nearly all the time), resuming from ROOT, and SIGKILLs
it after a random time. The parent then checks what a resume would read: the tracker names a complete
iteration whose common.json, DCP metadata and every shard read back whole (the model and the optimizer
state), and iterations never go backwards across trials. Interrupted saves (`iter_*.tmp`) are counted,
to show that the kills landed inside writes.
"""

import json
import os
import random
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.checkpoint import protocol, torch_dist  # noqa: E402
from tests.functional.gpt_cli import TINY, run_inprocess  # noqa: E402

ARGV = TINY + ["--train-iters", "100000", "--eval-iters", "0", "--log-interval", "1000", "--save-interval", "1",
               "--async-save", "--use-distributed-optimizer", "--bf16"]


def _child(root: str) -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    run_inprocess(ARGV + ["--save", root, "--load", root])


def check(root: str):
    """The iteration a resume would load, read back whole; raises when it is damaged."""
    iteration = protocol.read_tracker_or_none(root)
    if iteration is None:
        return None
    ckpt = torch_dist.load_unsharded(protocol.committed_dir(root, iteration), optimizer=True)
    assert ckpt["iteration"] == iteration, (ckpt["iteration"], iteration)
    assert ckpt["train_state"]["iteration"] == iteration
    assert "distrib_optim" in ckpt, "the optimizer state is missing"
    return iteration


def random_kills(root: str, trials: int, seed: int) -> dict:
    rng = random.Random(seed)
    loaded, problems, mid_save = [], [], 0
    for trial in range(trials):
        pid = os.fork()
        if pid == 0:
            try:
                _child(root)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(1.0, 3.0))
        mid_save += any(n.endswith(".tmp") for n in os.listdir(root)) if os.path.isdir(root) else 0
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        try:
            got = check(root)
            assert not loaded or got is None or loaded[-1] is None or got >= loaded[-1], (loaded[-1], got)
            loaded.append(got)
        except Exception as e:  # noqa: BLE001 - reported in the summary
            problems.append(f"trial {trial}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
    return {"trials": trials, "loaded": loaded, "problems": problems, "killed_mid_save": mid_save}


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    print(json.dumps(random_kills(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
