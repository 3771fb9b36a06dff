"""Kill checkpoint saves at any moment; the latest checkpoint must still load, whole.

    python tests/reliability/kill_saves.py random ROOT TRIALS SEED   # SIGKILL at a random moment
    python tests/reliability/kill_saves.py steps ROOT                # die before each file-system step

Prints one JSON summary line. A forked child saves in a loop through the real `save_checkpoint`, every
iteration twice (a new folder, then a re-save of the same iteration, which swaps folders), and reports
each completed save on a pipe. The parent lets 0-2 saves complete, then kills the child after a random
fraction of one save's duration (measured first, so the kills land inside saves on a fast machine and
on a loaded one alike). After the kill the parent loads the latest checkpoint as the trainer does
(no fallback) and checks it: it loads, every tensor holds the value written for its (iteration,
version), and it is not older than the last save the child completed. `steps` makes the child exit
(os._exit: no cleanup runs) just before the k-th file-system call of one save, for every k, for the
first save into an empty folder, a new iteration and a re-save, then checks that the next save
succeeds and leaves no leftovers.
"""

import json
import os
import random
import shutil
import signal
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from megatron.checkpoint import protocol as ck  # noqa: E402

N = 1 << 18  # floats per tensor: 1 MiB, so a save takes a few milliseconds
QUIET = dict(report=lambda message: None)


def state(iteration: int, version: int) -> dict:
    value = float(iteration * 10 + version)
    return {"model": {"w": torch.full((N,), value), "b": torch.full((N // 4,), value)}, "version": version}


def check(root: str, last_done) -> tuple:
    """(iteration, version) of the loadable latest checkpoint; raises AssertionError or UserError."""
    chosen = ck.select_checkpoint(root, **QUIET)
    if chosen is None:
        assert last_done is None, f"no checkpoint, but {last_done} was saved"
        return None
    iteration, ckpt = chosen
    got = (iteration, int(ckpt["version"]))
    want = float(iteration * 10 + got[1])
    assert all(bool((t == want).all()) and t.numel() > 0 for t in ckpt["model"].values()), f"mixed content {got}"
    assert last_done is None or got >= last_done, f"loaded {got}, older than the completed save {last_done}"
    return got


def _saver(root: str, fd: int) -> None:
    done = ck.read_tracker_or_none(root) or 0
    for iteration in range(done + 1, 10 ** 6):
        for version in (1, 2):
            ck.save_checkpoint(root, iteration, state(iteration, version), **QUIET)
            os.write(fd, f"{iteration} {version}\n".encode())


def _save_seconds(root: str) -> float:
    """How long one save (a new iteration, then a re-save) takes on this machine now."""
    scratch = os.path.join(root, "pace")
    start = time.monotonic()
    for version in (1, 2):
        ck.save_checkpoint(scratch, 1, state(1, version), **QUIET)
    shutil.rmtree(scratch)
    return (time.monotonic() - start) / 2


def _read_reports(fd: int, count: int) -> bytes:
    """What the child wrote once it reported `count` completed saves (or closed the pipe)."""
    data = b""
    while data.count(b"\n") < count:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def random_kills(root: str, trials: int, seed: int) -> dict:
    rng = random.Random(seed)
    loaded, problems, leftovers, last_done = [], [], 0, None
    pace = _save_seconds(root)
    for trial in range(trials):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                _saver(root, w)
            finally:
                os._exit(0)
        os.close(w)
        reports = _read_reports(r, rng.randint(0, 2))
        time.sleep(rng.uniform(0.0, 1.5 * pace))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as f:
            lines = (reports + f.read()).decode().split()
        if len(lines) >= 2:
            last_done = (int(lines[-2]), int(lines[-1]))
        names = [n for _, dirs, files in os.walk(root) for n in dirs + files]
        leftovers += any(n.endswith((".tmp", ".old", ".part")) for n in names)
        try:
            loaded.append(check(root, last_done))
        except Exception as e:  # noqa: BLE001 - reported in the summary
            problems.append(f"trial {trial}: {type(e).__name__}: {e}")
    return {"trials": trials, "loaded": loaded, "problems": problems, "killed_mid_save": leftovers}


class _DieAt:
    """Counts file-system calls; exits the process just before call number `at` (0: never)."""

    NAMES = ("makedirs", "mkdir", "replace", "rename", "remove", "unlink", "rmdir", "fsync")

    def __init__(self, at: int):
        self.at, self.calls, self.saved = at, 0, {}

    def __enter__(self):
        targets = [(os, n) for n in self.NAMES] + [(torch, "save")]
        for module, name in targets:
            real = getattr(module, name)
            self.saved[(module, name)] = real
            setattr(module, name, self._wrap(real))
        return self

    def _wrap(self, real):
        def call(*args, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                os._exit(9)
            return real(*args, **kwargs)
        return call

    def __exit__(self, *exc):
        for (module, name), real in self.saved.items():
            setattr(module, name, real)


def step_kills(root: str) -> dict:
    empty, base = os.path.join(root, "empty"), os.path.join(root, "base")
    os.makedirs(empty)
    ck.save_checkpoint(base, 1, state(1, 1), **QUIET)
    results, problems = {}, []
    for kind, start, iteration, before in (("first", empty, 1, None), ("new", base, 2, (1, 1)),
                                           ("resave", base, 1, (1, 1))):
        probe = os.path.join(root, f"{kind}-probe")
        shutil.copytree(start, probe)
        with _DieAt(0) as counter:  # a dry run counts the calls of one save
            ck.save_checkpoint(probe, iteration, state(iteration, 2), **QUIET)
        steps = counter.calls
        seen = set()
        for at in range(1, steps + 1):
            work = os.path.join(root, f"{kind}{at}")
            shutil.copytree(start, work)
            pid = os.fork()
            if pid == 0:
                with _DieAt(at):
                    ck.save_checkpoint(work, iteration, state(iteration, 2), **QUIET)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            try:
                assert os.WEXITSTATUS(status) == 9, f"the child did not die at step {at}"
                seen.add(check(work, before))
                ck.save_checkpoint(work, 3, state(3, 1), **QUIET)  # the next save recovers and cleans up
                assert check(work, (3, 1)) == (3, 1)
                names = os.listdir(work)
                assert not [n for n in names if n.endswith((".tmp", ".old"))], f"leftovers {names}"
            except Exception as e:  # noqa: BLE001 - reported in the summary
                problems.append(f"{kind} save, died before step {at}: {type(e).__name__}: {e}")
        results[kind] = {"steps": steps, "loaded": sorted(seen, key=str)}
    return {**results, "problems": problems}


if __name__ == "__main__":
    mode, root = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    if mode == "random":
        out = random_kills(root, int(sys.argv[3]), int(sys.argv[4]))
    else:
        out = step_kills(root)
    print(json.dumps(out))
