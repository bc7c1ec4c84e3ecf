"""The run directory's lock: one trainer per run_dir, refused ones delete nothing, stale locks of
killed runs are taken over, and under torchrun a refused run stops on every rank."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from prefixlm.cli import main
from prefixlm.train.lock import LOCK_FILE, RunLock, RunLocked

TINY = ["synthetic_train=200", "synthetic_eval=20", "capacity=512", "model.hidden=32",
        "model.heads=2", "model.layers=1", "model.ffn_hidden=64", "progress=false",
        "tensorboard=false"]


def _train_process(run_dir, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "prefixlm", "train", f"run_dir={run_dir}",
                             *TINY, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(condition, process, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the process ended before {what}: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _holder(run_dir):
    try:
        return json.loads((run_dir / LOCK_FILE).read_text())
    except (OSError, ValueError):
        return {}


def test_lock_is_exclusive_and_released(tmp_path):
    """Guards the lock itself: a second holder is refused while the first holds it (the flock is
    per open file, so this holds within one process too), and free again once released, with an
    empty file meaning a clean release."""
    first = RunLock(tmp_path).acquire()
    assert _holder(tmp_path)["pid"] == os.getpid()
    with pytest.raises(RunLocked, match=f"in use by pid {os.getpid()} on host "
                                        f"{socket.gethostname()}"):
        RunLock(tmp_path).acquire()
    first.release()
    assert (tmp_path / LOCK_FILE).read_text() == ""
    second = RunLock(tmp_path).acquire()
    assert second.stale is None
    second.release()


def test_second_trainer_on_a_running_run_dir_is_refused_and_deletes_nothing(tmp_path, capsys):
    """Guards two trainers on one run_dir: a second `prefixlm train` on a running job's run_dir
    ran alongside it with --resume (interleaved logs, checkpoints from whoever wrote last) and
    deleted its checkpoints with --overwrite, both exiting 0. Now each is refused with the
    holder's pid and host, exit 2, and the running job's files stay."""
    assert main(["train", f"run_dir={tmp_path}", *TINY, "steps=2"]) == 0
    capsys.readouterr()
    metrics_before = (tmp_path / "metrics.jsonl").stat().st_size
    job = _train_process(tmp_path, "--resume", "--new-schedule", "steps=100000", "ckpt_every=0")
    try:
        _wait_for(lambda: _holder(tmp_path).get("pid") == job.pid, job, "the job took the lock")
        # Training has started once a step is logged (a stop signal before it just ends the
        # process: there is nothing to save yet).
        _wait_for(lambda: (tmp_path / "metrics.jsonl").stat().st_size > metrics_before, job,
                  "the job's first step")
        before = sorted(p.name for p in (tmp_path / "checkpoints").rglob("*"))
        for flags in (["--resume"], ["--overwrite"], []):
            assert main(["train", *flags, f"run_dir={tmp_path}", *TINY, "steps=2"]) == 2, flags
            err = capsys.readouterr().err
            assert f"is in use by pid {job.pid} on host {socket.gethostname()}" in err, err
            assert err.count("\n") == 1, err
        assert sorted(p.name for p in (tmp_path / "checkpoints").rglob("*")) == before
        assert job.poll() is None
    finally:
        job.send_signal(signal.SIGTERM)
        job.communicate(timeout=120)
    assert job.returncode == 0


def test_stale_lock_of_a_killed_run_is_taken_over(tmp_path, capsys):
    """Guards a lock that outlives its run: after kill -9 the lock file still names the dead
    process, but its flock is free; the next run takes it over with a warning naming the dead
    holder, resumes from the newest complete checkpoint and runs to the end."""
    job = _train_process(tmp_path, "steps=100", "ckpt_every=2")
    try:
        _wait_for(lambda: (tmp_path / "checkpoints" / "step_00000002").is_dir(), job,
                  "the first checkpoint")
    finally:
        job.kill()
        job.communicate()
    assert _holder(tmp_path)["pid"] == job.pid  # the file left behind still names it
    assert main(["train", "--resume", f"run_dir={tmp_path}", *TINY, "steps=100",
                 "ckpt_every=2"]) == 0
    captured = capsys.readouterr()
    assert f"pid {job.pid} on host {socket.gethostname()}, ended without releasing it" in \
        captured.err
    assert "resumed from" in captured.out and "step_00000100" in captured.out
    assert (tmp_path / LOCK_FILE).read_text() == ""


def test_torchrun_on_a_locked_run_dir_stops_every_rank(tmp_path):
    """Guards the lock under torchrun: only rank 0 takes it, so when it is refused the other
    ranks must learn it (one all-reduce) instead of waiting for rank 0 forever; both ranks exit 2
    naming the holder, well within the timeout."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from prefixlm.train.lock import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(600)",
         str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "prefixlm", "train", f"run_dir={tmp_path}", *TINY, "steps=2"],
            capture_output=True, text=True, env=env, timeout=240)
    finally:
        holder.kill()
        holder.communicate()
    assert done.returncode != 0
    assert f"is in use by pid {holder.pid} on host" in done.stderr, done.stderr[-3000:]
    assert "rank 0 could not lock run_dir" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "checkpoints").exists()
