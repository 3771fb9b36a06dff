"""Preemption: SIGTERM/SIGINT with --exit-signal-handler, --exit-duration-in-mins, --exit-interval.
Each finishes the iteration, saves, exits 0; resuming gives the losses of an uninterrupted run."""

import contextlib
import io
import os
import signal
import subprocess
import sys
import time

from megatron.checkpoint import protocol
from tests.distributed.launcher import GLOO, run_distributed
from tests.functional.gpt_cli import REPO
from tests.reliability.common import NO_EVAL, TINY, load_entry, read_json_lines, run_inprocess, train_records

RUN = TINY + ["--train-iters", "12", "--hidden-dropout", "0.1", "--eval-interval", "4", "--eval-iters", "1",
              "--exit-signal-handler"]


def losses(path):
    return [(r["iteration"], r["lm_loss"]) for r in train_records(path)], [
        (r["iteration"], r["val_loss"]) for r in read_json_lines(path) if "val_loss" in r]


def test_sigterm_mid_run_then_resume_matches_uninterrupted(tmp_path):
    """SIGTERM to the whole process group (as SLURM sends it, DataLoader workers included) mid-run: the
    run saves and exits 0; resuming gives exactly the losses of the straight run."""
    straight, split = tmp_path / "straight.jsonl", tmp_path / "split.jsonl"
    assert run_inprocess(RUN + ["--log-json", str(straight), "--save", str(tmp_path / "a")]) == 0
    argv = RUN + ["--num-workers", "2", "--log-json", str(split), "--save", str(tmp_path / "b")]
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "tests/reliability/driver.py"), *argv], cwd=REPO,
                            env={**os.environ, "RELIABILITY_SLEEP": "0.05", "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 60
    while not (split.exists() and len(train_records(split)) >= 3) and time.time() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    stopped = train_records(split)[-1]["iteration"]
    assert 3 <= stopped < 12, stopped
    assert f"exiting at iteration {stopped}: received SIGTERM (--exit-signal-handler)" in out
    assert protocol.read_tracker(str(tmp_path / "b")) == stopped
    assert run_inprocess(RUN + ["--log-json", str(split), "--save", str(tmp_path / "b"),
                                "--load", str(tmp_path / "b")]) == 0
    assert losses(split) == losses(straight)
    assert [i for i, _ in losses(split)[0]] == list(range(1, 13))


def test_exit_duration_and_interval_save_and_exit(tmp_path, capsys):
    """Both stop like a signal: checkpoint at the stopping iteration, exit 0, no end-of-run evaluation."""
    argv = TINY + ["--train-iters", "50", "--eval-interval", "100", "--eval-iters", "1"]
    assert run_inprocess(argv + ["--save", str(tmp_path / "d"), "--exit-duration-in-mins", "1e-5"]) == 0
    out = capsys.readouterr().out
    stopped = protocol.read_tracker(str(tmp_path / "d"))
    assert 1 <= stopped < 50 and f"exiting at iteration {stopped}: ran 1e-05 minutes" in out
    assert "test set" not in out and "validation set" not in out
    assert run_inprocess(argv + ["--save", str(tmp_path / "i"), "--exit-interval", "3"]) == 0
    assert "exiting at iteration 3: --exit-interval" in capsys.readouterr().out
    assert protocol.complete_iterations(str(tmp_path / "i")) == [3]


def _signal_one_rank(rank, world, argv):
    """Rank 1 interrupts itself (SIGINT, as Ctrl-C would) during iteration 3; rank 0 is never signalled."""
    entry, real = load_entry(), load_entry().forward_step
    calls = []

    def forward_step(data_iterator, model):
        calls.append(1)
        if rank == 1 and len(calls) == 3:  # one micro-batch per iteration per rank here
            os.kill(os.getpid(), signal.SIGINT)
        return real(data_iterator, model)

    entry.forward_step = forward_step
    assert run_inprocess(argv) == 0


def _train_failing_writes_on_rank_1(rank, world, argv, fail, out):
    import torch

    if fail and rank == 1:
        def full_disk(*a, **k):
            raise OSError(28, "No space left on device")

        torch.save = full_disk
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run_inprocess(argv) == (2 if fail else 0)
    (out / f"rank{rank}.err").write_text(err.getvalue())


def test_ranks_agree_on_stops_and_on_failed_saves(tmp_path):
    """Two gloo ranks. A signal reaching only rank 1 stops both after the same iteration, with one
    checkpoint; a write failing only on rank 1 fails the save on both (no hang), previous kept."""
    argv = TINY + GLOO + ["--train-iters", "8", "--eval-iters", "0", "--exit-signal-handler",
                          "--save", str(tmp_path / "s"), "--log-json", str(tmp_path / "s.jsonl")]
    run_distributed(_signal_one_rank, world_size=2, args=(argv,), hang_after_s=300)
    assert [r["iteration"] for r in train_records(tmp_path / "s.jsonl")] == [1, 2, 3]
    assert protocol.complete_iterations(str(tmp_path / "s")) == [3]
    assert protocol.read_tracker(str(tmp_path / "s")) == 3

    # the same with the distributed optimizer (DP=2): the stop and the save, whose shard gather is collective,
    # happen together; the checkpoint holds the gathered optimizer state
    argv = TINY + GLOO + ["--train-iters", "8", "--eval-iters", "0", "--exit-signal-handler", "--use-distributed-optimizer",
                          "--overlap-param-gather", "--save", str(tmp_path / "d"), "--log-json", str(tmp_path / "d.jsonl")]
    run_distributed(_signal_one_rank, world_size=2, args=(argv,), hang_after_s=300)
    assert [r["iteration"] for r in train_records(tmp_path / "d.jsonl")] == [1, 2, 3]
    assert protocol.read_tracker(str(tmp_path / "d")) == 3
    assert (tmp_path / "d" / "iter_0000003" / "mp_rank_00" / "distrib_optim.pt").is_file()

    tp2 = TINY + GLOO + ["--eval-iters", "0", "--tensor-model-parallel-size", "2", "--save", str(tmp_path / "w"),
                         "--save-interval", "2", "--train-iters", "4"]
    run_distributed(_train_failing_writes_on_rank_1, world_size=2,
                    args=(tp2 + ["--exit-interval", "2"], False, tmp_path), hang_after_s=300)
    run_distributed(_train_failing_writes_on_rank_1, world_size=2,
                    args=(tp2 + ["--load", str(tmp_path / "w")], True, tmp_path), hang_after_s=300)
    assert protocol.read_tracker(str(tmp_path / "w")) == 2
    assert sorted(os.listdir(tmp_path / "w")) == ["iter_0000002", "latest_checkpointed_iteration.txt"]
    head = f"error: cannot write the checkpoint of iteration 4 to {tmp_path / 'w'}"
    kept = "the checkpoint of iteration 2 is intact"
    assert (tmp_path / "rank1.err").read_text().splitlines() == [f"{head} (No space left on device); {kept}"]
    assert (tmp_path / "rank0.err").read_text().splitlines() == [f"{head} on another rank; {kept}"]


def test_signal_during_start_up_exits_0_without_saving(tmp_path, capsys, monkeypatch):
    """A SIGTERM while the datasets are built: the run stops before the first iteration, exit 0, and
    saves nothing (there is nothing new to save); no log record either."""
    entry = load_entry()
    real = entry.build_gpt_datasets

    def signalled_while_building(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # recorded by --exit-signal-handler, which is installed by now
        return real(*args, **kwargs)

    monkeypatch.setattr(entry, "build_gpt_datasets", signalled_while_building)
    argv = TINY + NO_EVAL + ["--train-iters", "4", "--exit-signal-handler", "--save", str(tmp_path / "ck"),
                             "--log-json", str(tmp_path / "m.jsonl")]
    assert run_inprocess(argv) == 0
    out = capsys.readouterr().out
    assert " exiting before training: received SIGTERM (--exit-signal-handler)" in out and " training for " not in out
    assert not (tmp_path / "ck").exists() and not (tmp_path / "m.jsonl").exists()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler was put back


def test_signal_handler_without_save_warns_at_start_up(capsys):
    argv = TINY + NO_EVAL + ["--train-iters", "1", "--lr-warmup-iters", "0", "--exit-signal-handler"]
    assert run_inprocess(argv) == 0
    out = capsys.readouterr().out
    warning = "WARNING: --exit-signal-handler without --save: a signal stops the run cleanly, but nothing is saved"
    assert warning in out and out.index(warning) < out.index(" training for ")


def test_repeated_signals_are_recorded_not_escalated():
    """SLURM and torchrun may both deliver one SIGTERM: the second copy must not kill the save."""
    from megatron.training.signals import SignalRecorder

    recorder = SignalRecorder().install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert recorder.received == signal.SIGTERM and recorder.name == "SIGTERM"
    finally:
        recorder.restore()
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
