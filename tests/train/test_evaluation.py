"""Evaluation during training: eval_every, task metrics, the best checkpoint across a resume,
and the W&B sink (offline, read back from its run file)."""

import json
import os

import pytest
import torch

from evalhelpers import MMLU, MMLU_SHOTS
from prefixlm.cli import main
from prefixlm.data import PackedLoader, V1Dataset
from prefixlm.train.checkpoint import complete_checkpoints, load_trained, read_best
from prefixlm.train.run import eval_batches_from
from prefixlm.train.trainer import Trainer, evaluate
from trainhelpers import CPU, small_config


def _trainer(cfg, prepared_dir):
    dataset = V1Dataset(prepared_dir)
    return Trainer(cfg, CPU, PackedLoader(dataset, cfg.capacity, seed=cfg.seed),
                   eval_batches=eval_batches_from(dataset, cfg, "cpu", 24),
                   tokenizer=dataset.tokenizer())


def _evals(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "eval"]


def test_best_checkpoint_is_kept_beside_the_last_and_survives_a_resume(tmp_path, prepared_dir):
    """Guards best-checkpoint keeping: with eval_every 2 the best evaluation's checkpoint is in
    checkpoints/best (its weights give exactly the logged value) even after keep_checkpoints=1
    rotated its step away, and a resumed run compares against the best so far instead of
    starting over (here best_mode=max on the loss, so the best stays at an early step)."""
    run = tmp_path / "run"
    extra = ["eval_every=2", "ckpt_every=0", "keep_checkpoints=1", "best_metric=eval/loss",
             "best_mode=max"]
    trainer = _trainer(small_config(run, "steps=6", *extra), prepared_dir)
    trainer.fit()
    trainer.close()
    losses = {r["step"]: r["loss"] for r in _evals(run)}
    assert sorted(losses) == [2, 4, 6]

    trainer = _trainer(small_config(run, "steps=10", *extra), prepared_dir)
    trainer.resume()
    trainer.fit()
    trainer.close()
    losses = {r["step"]: r["loss"] for r in _evals(run)}
    assert sorted(losses) == [2, 4, 6, 8, 10]
    best_step = max(losses, key=losses.get)
    assert best_step <= 6, "the set-up needs the best before the resume to test the resume"
    best = read_best(run / "checkpoints")
    assert best == {"step": best_step, "metric": "eval/loss", "mode": "max",
                    "value": losses[best_step], "checkpoint": f"step_{best_step:08d}"}
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step_00000010"]
    model, cfg, _, _ = load_trained(run / "checkpoints" / "best", backend="sdpa")
    again = evaluate(model, trainer.eval_batches(), cfg, torch.device("cpu"))
    assert again["loss"] == pytest.approx(losses[best_step], rel=1e-6)


def test_task_metrics_during_training_equal_prefixlm_eval(tmp_path, prepared_dir, capsys):
    """Guards eval_tasks in training: the eval records carry the tasks' metrics (HRM-Text's keys,
    as TASK/METRIC) and, at the last step, exactly what `prefixlm eval --tasks` gives for the
    final checkpoint (same EMA weights, prompts, greedy answers). MCQ's chance credit makes the
    untrained model's score non-zero."""
    task = tmp_path / "mmlu.yaml"
    task.write_text(f"preset: mmlu\ndata: {MMLU}\nshots: {MMLU_SHOTS}\nnum_shots: 1\n")
    run = tmp_path / "run"
    cfg = small_config(run, "steps=4", "eval_every=2", f"eval_tasks={task}",
                       "eval_task_condition=none", "context_size=256", "capacity=512",
                       "best_metric=eval/mmlu/acc")
    trainer = _trainer(cfg, prepared_dir)
    trainer.fit()
    last = trainer.evaluate()  # the end of a run: not evaluated twice
    trainer.close()
    evals = _evals(run)
    assert [r["step"] for r in evals] == [2, 4] and last == {k: v for k, v in evals[-1].items()
                                                           if k not in ("kind", "step")}
    assert {"loss", "exact_match", "mmlu/acc", "mmlu/acc_astronomy", "mmlu/n"} <= set(last)
    assert (run / "checkpoints" / "best").is_dir()
    assert main(["eval", "--checkpoint", str(run), "--tasks", str(task), "--condition", "none",
                 "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)["tasks"]["mmlu"]["metrics"]
    assert {f"mmlu/{k}": v for k, v in cli.items()} == {k: v for k, v in last.items()
                                                        if k.startswith("mmlu/")}
    assert 0 < last["mmlu/acc"] < 1


def test_wandb_offline_logs_what_metrics_jsonl_holds(tmp_path, prepared_dir, monkeypatch):
    """Guards the W&B sink: offline (no network, no login) it records the train and eval values
    of metrics.jsonl at their steps as train/KEY and eval/KEY, the run's config, its name, and
    keeps the run id in run_dir/wandb_id for a resume."""
    wandb = pytest.importorskip("wandb", reason="the [wandb] extra is not installed")
    from wandbhelpers import read_offline_run

    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    assert os.environ["WANDB_MODE"] == "offline"
    run = tmp_path / "run"
    trainer = _trainer(small_config(run, "steps=3", "eval_every=3", "wandb=true",
                                    "wandb_project=tests"), prepared_dir)
    trainer.fit()
    trainer.close()
    wandb.teardown()  # flushes the run file
    logged = read_offline_run(run)
    assert logged["id"] == (run / "wandb_id").read_text().strip()
    assert logged["name"] == "run" and logged["project"] == "tests"
    assert logged["config"]["lr"] == 1e-2 and logged["config"]["num_params"] > 0
    rows = {row["_step"]: row for row in logged["history"]}
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        row = rows[record["step"]]
        for key in ("loss", "token_acc") if record["kind"] == "train" else ("loss", "exact_match"):
            assert row[f"{record['kind']}/{key}"] == pytest.approx(record[key], rel=1e-12)
    assert sorted(rows) == [1, 2, 3] and "eval/loss" in rows[3]


def test_wandb_sink_never_logs_an_older_step():
    """Guards W&B's monotonic steps (it drops a lower step with a warning): records of steps
    already logged, as a resumed run may write, are skipped; booleans and NaN are not logged."""
    from prefixlm.train.wandb_log import WandbLog

    logged = []

    class Run:
        def log(self, values, step):
            logged.append((step, values))

    sink = WandbLog.__new__(WandbLog)
    sink.run, sink.last_step = Run(), -1
    for record in ({"kind": "train", "step": 5, "loss": 1.0, "flag": True, "bad": float("nan")},
                   {"kind": "eval", "step": 5, "loss": 2.0}, {"kind": "train", "step": 4,
                                                              "loss": 3.0}):
        sink.write(record)
    assert logged == [(5, {"train/loss": 1.0}), (5, {"eval/loss": 2.0})]


def test_evaluation_settings_are_checked(tmp_path, prepared_dir):
    """Guards silent no-ops: best_metric without any evaluation, a best_metric the evaluation
    does not produce (the error lists what it does), and a malformed best_metric."""
    with pytest.raises(ValueError, match="needs an evaluation"):
        Trainer(small_config(tmp_path, "best_metric=eval/loss"), CPU,
                PackedLoader(V1Dataset(prepared_dir), 256))
    trainer = _trainer(small_config(tmp_path / "r", "steps=1", "best_metric=eval/acc"),
                       prepared_dir)
    trainer.fit()
    with pytest.raises(ValueError, match=r"no 'acc'; it has eval/exact_match, eval/loss"):
        trainer.evaluate()
    with pytest.raises(ValueError, match="best_metric names an evaluation metric"):
        small_config(tmp_path, "best_metric=loss")


def test_overwrite_removes_the_previous_runs_best_checkpoint(tmp_path, capsys):
    """Guards `prefixlm train --overwrite` keeping checkpoints/best of the run it replaces: a
    later `eval --checkpoint RUN/checkpoints/best` or a resume would read weights of a run that
    no longer exists. Every checkpoint of the old run goes, the best one included."""
    tiny = ["synthetic_train=200", "synthetic_eval=20", "capacity=512", "model.hidden=32",
            "model.heads=2", "model.layers=1", "model.ffn_hidden=64", "progress=false",
            "tensorboard=false", "steps=2", f"run_dir={tmp_path}"]
    assert main(["train", *tiny, "eval_every=1", "best_metric=eval/loss"]) == 0
    assert read_best(tmp_path / "checkpoints") is not None
    assert main(["train", "--overwrite", *tiny]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]
    assert read_best(tmp_path / "checkpoints") is None
