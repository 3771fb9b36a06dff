"""Checkpoint save and load time on CPU: `torch` against `torch_dist`, synchronous against `--async-save`.

    python bench/checkpoint_io.py [--layers 16 --hidden 1024] [--out docs/results/checkpoint_io.json]

One process trains a GPT of a few hundred million parameters (default 16 layers, h 1024, vocab 50304:
about 253M parameters; bf16 weights, fp32 main parameters and Adam moments with the distributed optimizer,
so a checkpoint holds 2 + 12 bytes per parameter, 3.3 GiB) for 4 iterations on mock data, saving after
iterations 2 and 4, in each of three modes: `--ckpt-format torch`, `torch_dist`, and `torch_dist
--async-save`. It reads the trainer's own log lines:

    stall      how long training stood still for a save: the save line's `[ t ]` (for --async-save, the
               staging into host memory; the write runs in a background thread);
    write      --async-save: how long the background write and commit took;
    step       the iteration times: iteration 3 runs while --async-save writes iteration 2's checkpoint
               (on 2 cores the write competes with training for them);
    load       a resume from the last checkpoint (`successfully loaded ... [ t ]`);
    size       bytes on disk of one checkpoint;
    disk       this disk's own write speed (1 GiB written and fsynced before and after), to read the
               synchronous stalls against: on a virtual disk it varies several-fold from minute to minute.

Numbers depend on the disk and on what else runs; docs/checkpoints.md records one run with its command.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODES = {"torch": ["--ckpt-format", "torch"], "torch_dist": [], "torch_dist async": ["--async-save"]}


def _flags(a, save, extra):
    return ["--num-layers", str(a.layers), "--hidden-size", str(a.hidden), "--num-attention-heads", "16",
            "--seq-length", "64", "--micro-batch-size", "1", "--global-batch-size", "1", "--lr", "1e-4",
            "--tokenizer-type", "NullTokenizer", "--vocab-size", "50257", "--mock-data", "--num-workers", "0",
            "--eval-iters", "0", "--log-interval", "1", "--bf16", "--use-distributed-optimizer",
            "--hidden-dropout", "0", "--attention-dropout", "0", "--save", save, *extra]


def _run(argv):
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, os.path.join(REPO, "pretrain_gpt_ltd.py"), *argv], capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return proc.stdout, time.perf_counter() - t0


def _size(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def disk_mb_s(work) -> float:
    """MB/s of writing 1 GiB and fsyncing it: what bounds a synchronous save on one process."""
    block, path = bytes(2 ** 24), os.path.join(work, "disk_probe")
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(64):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - t0
    os.remove(path)
    return 2 ** 30 / 1e6 / seconds


def measure(a, mode, work):
    save = os.path.join(work, mode.replace(" ", "_"))
    out, _ = _run(_flags(a, save, MODES[mode] + ["--train-iters", "4", "--save-interval", "2"]))
    stalls = [float(x) for x in re.findall(r"(?:successfully saved|staged) checkpoint at iteration .*?\[ t ([\d.]+)s \]", out)]
    writes = [float(x) for x in re.findall(r"written in the background for ([\d.]+)s", out)]
    steps = [float(x) for x in re.findall(r"elapsed time per iteration \(ms\): ([\d.]+)", out)]
    params = int(re.search(r"number of parameters on .*?: (\d+)", out).group(1))
    size = _size(os.path.join(save, "iter_0000004"))
    out, _ = _run(_flags(a, save, MODES[mode] + ["--train-iters", "4", "--load", save]))
    load = float(re.search(r"successfully loaded checkpoint .*?\[ t ([\d.]+)s \]", out).group(1))
    shutil.rmtree(save)
    return {"parameters": params, "stall_s": stalls, "background_write_s": writes, "step_ms": steps,
            "load_s": load, "bytes": size}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--out", default=None, help="also write the results here as JSON")
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="ckpt_io_")
    try:
        disk = [disk_mb_s(work)]
        results = {mode: measure(a, mode, work) for mode in MODES}
        disk.append(disk_mb_s(work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for mode, r in results.items():
        print(f"{mode:17s} {r['parameters'] / 1e6:6.0f}M params  {r['bytes'] / 2**30:5.2f} GiB  stall "
              f"{', '.join(f'{s:.2f}' for s in r['stall_s'])} s  write {', '.join(f'{s:.2f}' for s in r['background_write_s']) or '-'} s"
              f"  steps {', '.join(f'{s / 1000:.2f}' for s in r['step_ms'])} s  load {r['load_s']:.2f} s")
    print(f"disk write speed {disk[0]:.0f} MB/s before, {disk[1]:.0f} MB/s after")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"command": " ".join(["python", "bench/checkpoint_io.py", *sys.argv[1:]]),
                       "disk_write_mb_s": disk, **results}, f, indent=1)


if __name__ == "__main__":
    main()
