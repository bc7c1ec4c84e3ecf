"""Two gloo processes with FSDP2 on CPU against one process on the same global batch."""

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefixlm.model import PrefixLM
from prefixlm.train.checkpoint import load_model_weights
from prefixlm.train.distributed import Dist

HERE = Path(__file__).parent
CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _torchrun(args, timeout=240, env=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("arch,per_unit", [("transformer", 1), ("hrm", 1), ("hrm", 3)])
def test_fsdp2_gloo_matches_single_process(tmp_path, arch, per_unit):
    """Guards the loss normalisation and sharding under torchrun: 2 FSDP2 ranks (one micro-batch
    each) give the losses and final weights of 1 process accumulating the same 2 micro-batches,
    and the sharded DCP checkpoint loads in a single process. HRM calls every FSDP unit several
    times per forward, partly without autograd; with 3 blocks per unit its H and L blocks share
    a unit."""
    sys.path.insert(0, str(HERE))
    from dist_worker import DIST_CONFIG, run

    extra = [f"model.arch={arch}", f"fsdp_blocks_per_unit={per_unit}"]
    single = run(str(tmp_path / "single.json"), str(tmp_path / "single"), 2, dist=CPU,
                 extra=extra)
    done = _torchrun([str(HERE / "dist_worker.py"), str(tmp_path / "dist.json"),
                      str(tmp_path / "dist"), "1", *extra])
    assert done.returncode == 0, done.stderr[-3000:]
    expected = json.loads((tmp_path / "single.json").read_text())
    got = json.loads((tmp_path / "dist.json").read_text())
    assert len(got) == len(expected) == 4
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5)

    model = PrefixLM(single.cfg.model)
    load_model_weights(tmp_path / "dist" / "checkpoints" / "step_00000004", model, use_ema=False)
    for (name, a), b in zip(single.model.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a.detach(), rtol=1e-4, atol=1e-5, msg=name)
    # The EMA, which the ranks update on their local shards.
    load_model_weights(tmp_path / "dist" / "checkpoints" / "step_00000004", model, use_ema=True)
    for name, b in model.named_parameters():
        torch.testing.assert_close(b, single.ema.shadow[name], rtol=1e-4, atol=1e-5, msg=name)
    assert "model.layers=2" in DIST_CONFIG


def test_torchrun_prefixlm_train_cli(tmp_path):
    """Guards the real entry point under torchrun (data preparation on rank 0 only, barriers,
    FSDP2 checkpoint, final eval on every rank) from hanging or crashing."""
    done = _torchrun(["-m", "prefixlm", "train", f"run_dir={tmp_path}", "steps=3",
                      "synthetic_train=300", "synthetic_eval=40", "capacity=512",
                      "model.hidden=32", "model.heads=2", "progress=false"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "held-out exact match" in done.stdout
    assert (tmp_path / "checkpoints" / "step_00000003" / "rank00001.pt").is_file()
    # --resume under torchrun: every rank agrees on the checkpoint through a collective.
    done = _torchrun(["-m", "prefixlm", "train", "--resume", "--new-schedule",
                      f"run_dir={tmp_path}", "steps=5",
                      "synthetic_train=300", "synthetic_eval=40", "capacity=512",
                      "model.hidden=32", "model.heads=2", "progress=false"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "checkpoints" / "step_00000005" / "rank00001.pt").is_file()


def test_collectives_of_cpu_tensors_go_through_the_gpu_under_nccl(monkeypatch):
    """NCCL reduces CUDA tensors only: a resume under torchrun on GPUs once died all-reducing a
    CPU flag ("No backend type associated with device type cpu")."""
    import torch.distributed as torch_dist

    from prefixlm.train import distributed

    monkeypatch.setattr(torch_dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert distributed.collective_device(torch.zeros(1)) == torch.device("cuda", 1)
    monkeypatch.setattr(torch_dist, "get_backend", lambda *a: "gloo")
    assert distributed.collective_device(torch.zeros(1)) == torch.device("cpu")


def test_fsdp_units_group_consecutive_blocks():
    """Guards `fsdp_blocks_per_unit`: 5 blocks at 2 per unit give the units {0,1} {2,3} {4} (one
    parameter group each: one all-gather per unit), at 1 per unit five. FSDP2 keeps a unit's
    parameter group on each of its modules' state (private attribute, read only here)."""
    import dataclasses

    import torch.distributed as torch_dist

    from prefixlm.model.config import preset_config
    from prefixlm.train.distributed import shard_model

    cfg = dataclasses.replace(preset_config("tiny"), vocab_size=64, layers=5)
    torch_dist.init_process_group("gloo", store=torch_dist.HashStore(), rank=0, world_size=1)
    try:
        for per_unit, expected in ((2, [0, 0, 1, 1, 2]), (1, [0, 1, 2, 3, 4])):
            model = shard_model(PrefixLM(cfg), CPU, blocks_per_unit=per_unit)
            groups = [id(block._get_fsdp_state()._fsdp_param_group)
                      for block in model.all_blocks()]
            units = list(dict.fromkeys(groups))  # distinct groups in block order
            assert [units.index(g) for g in groups] == expected, per_unit
    finally:
        torch_dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["blocks", "cycles"])
def test_fsdp2_with_activation_checkpointing_matches_single_process(tmp_path, mode):
    """Guards activation checkpointing under FSDP2: the backward's recomputation must find the
    recomputed blocks' parameters gathered (FSDP2 regathers a unit that a checkpointed region
    needs again, also for HRM's units called several times per forward), so 2 gloo ranks with
    checkpointing give the losses and final weights of 1 process without it."""
    sys.path.insert(0, str(HERE))
    from dist_worker import run

    extra = ["model.arch=hrm"]
    single = run(str(tmp_path / "single.json"), str(tmp_path / "single"), 2, dist=CPU,
                 extra=extra)
    done = _torchrun([str(HERE / "dist_worker.py"), str(tmp_path / "dist.json"),
                      str(tmp_path / "dist"), "1", *extra, f"activation_checkpointing={mode}"])
    assert done.returncode == 0, done.stderr[-3000:]
    expected = json.loads((tmp_path / "single.json").read_text())
    torch.testing.assert_close(json.loads((tmp_path / "dist.json").read_text()), expected,
                               rtol=2e-5, atol=2e-5)
    model = PrefixLM(single.cfg.model)
    load_model_weights(tmp_path / "dist" / "checkpoints" / "step_00000004", model, use_ema=False)
    for (name, a), b in zip(single.model.named_parameters(), model.parameters()):
        torch.testing.assert_close(b, a.detach(), rtol=1e-4, atol=1e-5, msg=name)


def test_torchrun_training_with_evaluation_wandb_and_checkpointing(tmp_path):
    """Guards the training conveniences under torchrun: eval_every with a generated-answer task
    on every rank (without rank 0's tokens the ranks could decode differently and hang), the
    best checkpoint written once, W&B on rank 0 only, HRM's cycles checkpointed."""
    from evalhelpers import MMLU, MMLU_SHOTS

    task = tmp_path / "mmlu.yaml"
    task.write_text(f"preset: mmlu\ndata: {MMLU}\nshots: {MMLU_SHOTS}\nnum_shots: 1\n")
    run_dir = tmp_path / "run"
    env_home = tmp_path / "wandb-home"
    done = _torchrun(["-m", "prefixlm", "train", f"run_dir={run_dir}", "steps=4",
                      "synthetic_train=300", "synthetic_eval=40", "capacity=512",
                      "model.hidden=32", "model.heads=2", "model.arch=hrm", "progress=false",
                      "eval_every=2", f"eval_tasks={task}", "eval_task_condition=none",
                      "best_metric=eval/mmlu/acc", "wandb=true", "tensorboard=false",
                      "activation_checkpointing=cycles"],
                     env={"WANDB_MODE": "offline", "WANDB_CACHE_DIR": str(env_home),
                          "WANDB_CONFIG_DIR": str(env_home), "WANDB_DATA_DIR": str(env_home)})
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and all("mmlu/acc" in r for r in evals)
    assert (run_dir / "checkpoints" / "best" / "best.json").is_file()
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1
    assert "task mmlu: acc" in done.stdout


SAVE_FAILS_ON_RANK_1 = """
import errno, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[2])
import torch
from prefixlm.train import checkpoint
from prefixlm.train.distributed import setup, teardown
from dist_worker import DIST_CONFIG
from prefixlm.train.config import load_config
from prefixlm.train.trainer import Trainer
from prefixlm.data.synthetic import make_samples
from trainhelpers import ListLoader, encode

real = checkpoint.write_bytes
def write_bytes(path, data):
    if path.name == "rank00001.pt":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    real(path, data)
checkpoint.write_bytes = write_bytes
torch.set_num_threads(1)
dist = setup("cpu")
cfg = load_config(None, DIST_CONFIG + [f"run_dir={sys.argv[1]}", "steps=2", "ckpt_every=2"])
loader = ListLoader(encode(make_samples(400, 0)), cfg.capacity, rank=dist.rank,
                    world_size=dist.world_size)
try:
    Trainer(cfg, dist, loader).fit()
except OSError as exc:
    Path(sys.argv[1], f"error{dist.rank}").write_text(str(exc))
finally:
    teardown()
"""


def test_a_save_failing_on_one_rank_fails_on_every_rank(tmp_path):
    """Guards a hang when one rank cannot write its part of a checkpoint (disk full on its node):
    the ranks exchange their errors, so rank 1 raises its own and rank 0 one naming rank 1, both
    naming the checkpoint, and the temporary folder is removed."""
    script = tmp_path / "worker.py"
    script.write_text(SAVE_FAILS_ON_RANK_1)
    run_dir = tmp_path / "run"
    done = _torchrun([str(script), str(run_dir), str(HERE)])
    assert done.returncode == 0, done.stderr[-3000:]
    tmp = run_dir / "checkpoints" / ".tmp-step_00000002"
    error1 = (run_dir / "error1").read_text()
    assert error1.startswith(f"[Errno {errno.ENOSPC}] No space left on device"), error1
    assert str(tmp) in error1
    rank0 = (run_dir / "error0").read_text()
    assert "rank 1 could not save its part of the checkpoint (" in rank0 and str(tmp) in rank0
    assert list((run_dir / "checkpoints").iterdir()) == []
