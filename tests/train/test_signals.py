"""Preemption: SIGTERM/SIGINT end a training run after its step with a checkpoint, exit 0, and the
run resumes as if never stopped; a second signal stops at once; under torchrun all ranks stop at
the same step."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from prefixlm.cli import main
from prefixlm.train import checkpoint as ckpt
from prefixlm.train.signals import GracefulStop, Interrupted

TINY = ["synthetic_train=200", "synthetic_eval=20", "capacity=512", "model.hidden=32",
        "model.heads=2", "model.layers=1", "model.ffn_hidden=64", "progress=false",
        "tensorboard=false", "log_every=1", "ckpt_every=0", "steps=150"]
STOPPED = re.compile(r"stopped by (\S+(?: \S+)*?) after step (\d+); checkpoint: (\S+) "
                     r"\(continue with --resume\)")


def _records(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _wait_for_steps(run_dir, process, count, timeout=120):
    deadline = time.monotonic() + timeout
    path = Path(run_dir) / "metrics.jsonl"
    while not (path.is_file() and path.read_text().count("\n") >= count):
        if process.poll() is not None:
            raise AssertionError(f"training ended early: {process.communicate()}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting for training steps")
        time.sleep(0.02)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_and_the_resumed_run_equals_a_straight_one(tmp_path, capsys, signum):
    """Guards preemption losing work (SIGTERM acted like kill -9: everything since the last
    periodic checkpoint was lost): the signalled run finishes its step, writes a checkpoint, says
    where and exits 0; resuming from it gives exactly the losses of a run never stopped, with
    every step once in metrics.jsonl."""
    assert main(["train", f"run_dir={tmp_path / 'straight'}", *TINY]) == 0
    capsys.readouterr()
    expected = [(r["step"], r["loss"]) for r in _records(tmp_path / "straight")
                if r["kind"] == "train"]

    run_dir = tmp_path / "stopped"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, "-m", "prefixlm", "train", f"run_dir={run_dir}",
                            *TINY], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    _wait_for_steps(run_dir, job, 5)
    job.send_signal(signum)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    found = STOPPED.search(out)
    assert found, out
    name, step, where = found.group(1), int(found.group(2)), Path(found.group(3))
    assert name == signal.Signals(signum).name and 5 <= step < 150
    assert where == run_dir / "checkpoints" / f"step_{step:08d}" and ckpt.verify(where) is None
    assert "held-out" not in out  # no evaluation after a stop

    assert main(["train", "--resume", f"run_dir={run_dir}", *TINY]) == 0
    assert f"resumed from {where} (step {step})" in capsys.readouterr().out
    got = [(r["step"], r["loss"]) for r in _records(run_dir) if r["kind"] == "train"]
    assert got == expected


def test_second_signal_stops_at_once():
    """Guards a stop that cannot be hurried: the first SIGTERM/SIGINT only asks (the loop
    finishes its step), the second raises Interrupted at once; the previous handlers come back
    after the block."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.requested and stop.signal_name == "SIGTERM"
        with pytest.raises(Interrupted) as raised:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        assert raised.value.signum == signal.SIGINT
    assert {sig: signal.getsignal(sig) for sig in before} == before


def test_cli_exit_code_of_an_interrupted_run(monkeypatch, capsys):
    """Guards the exit status of a run stopped at once by a second signal: 128 + the signal's
    number (143 for SIGTERM, 130 for SIGINT), as a shell reports a process killed by it."""
    from prefixlm.train import run

    def interrupted(*args, **kwargs):
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(run, "run_training", interrupted)
    assert main(["train", "steps=3"]) == 128 + signal.SIGTERM
    assert "interrupted (SIGTERM)" in capsys.readouterr().err


def _pid_with_env(tag: str, rank: str, timeout=120) -> int:
    """The process whose environment holds PREFIXLM_TEST_TAG=tag and RANK=rank."""
    deadline = time.monotonic() + timeout
    want = {f"PREFIXLM_TEST_TAG={tag}".encode(), f"RANK={rank}".encode()}
    while time.monotonic() < deadline:
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                environ = set(Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"))
            except OSError:
                continue
            if want <= environ:
                return int(entry)
        time.sleep(0.1)
    raise AssertionError(f"no process with RANK={rank}")


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="needs Linux /proc")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """Guards ranks that disagree on when to stop (one rank checkpoints and leaves while the
    others wait in a collective): a SIGTERM to rank 1 alone is voted on in the step's all-reduce,
    so both ranks stop after the same step, write one complete checkpoint and exit 0."""
    tag = uuid.uuid4().hex
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PREFIXLM_TEST_TAG": tag}
    job = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "prefixlm", "train", f"run_dir={tmp_path}", *TINY, "steps=2000"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rank1 = _pid_with_env(tag, "1")
    _wait_for_steps(tmp_path, job, 3, timeout=180)
    os.kill(rank1, signal.SIGTERM)
    out, err = job.communicate(timeout=180)
    assert job.returncode == 0, err[-3000:]
    found = STOPPED.search(out)
    assert found and found.group(1) == "a stop signal on another rank", out
    step = int(found.group(2))
    where = tmp_path / "checkpoints" / f"step_{step:08d}"
    assert ckpt.verify(where) is None
    assert (where / "rank00000.pt").is_file() and (where / "rank00001.pt").is_file()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [where.name]
