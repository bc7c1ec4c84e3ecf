"""The run's logs after resumes: every step once in metrics.jsonl and in TensorBoard."""

import json
import shutil

import pytest

from prefixlm.train.metrics import MetricsLog
from trainhelpers import small_config, trainer_on


def _killed_before_saving(run_dir, step):
    """As if the run had died after `step` but before its checkpoint (fit(until=) saves one)."""
    shutil.rmtree(run_dir / "checkpoints" / f"step_{step:08d}")


def _steps(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def test_metrics_jsonl_has_each_step_once_after_resumes(tmp_path, prepared_dir):
    """Guards metrics.jsonl repeating steps after a resume: a run killed after step 7 with its
    newest checkpoint at 4 had logged 5..7, which the resumed run logged again. A resumed run
    drops the records past its checkpoint (and a line torn by the kill) before it logs."""
    cfg = small_config(tmp_path, "steps=12", "ckpt_every=4", "tensorboard=false")
    trainer_on(cfg, prepared_dir).fit(until=7)
    _killed_before_saving(tmp_path, 7)  # newest checkpoint 4, records up to 7
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 8, "lo')  # a record cut off by the kill
    for until in (10, 12):  # two resumes: from 4 (to 10), then from 8
        trainer = trainer_on(cfg, prepared_dir)
        trainer.resume()
        trainer.fit(until=until)
    assert _steps(tmp_path) == list(range(1, 13))


def test_fresh_start_drops_an_earlier_attempts_records(tmp_path):
    """Guards a run restarted without a checkpoint (killed before its first save) appending to
    the old attempt's records: `start(0)` keeps none of them."""
    log = MetricsLog(tmp_path, enabled=True, tensorboard=False)
    for step in (1, 2, 3):
        log.write({"kind": "train", "step": step, "loss": 1.0})
    log.start(0)
    log.write({"kind": "train", "step": 1, "loss": 2.0})
    assert _steps(tmp_path) == [1]


def test_tensorboard_shows_each_step_once_after_a_resume(tmp_path, prepared_dir):
    """Guards TensorBoard double-logging the steps between a checkpoint and a kill: the resumed
    run's writer carries purge_step, so TensorBoard's reader drops the older events of those
    steps and shows each step once, with the resumed run's values."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = small_config(tmp_path, "steps=10", "ckpt_every=4", "tensorboard=true")
    first = trainer_on(cfg, prepared_dir)
    first.fit(until=6)
    first.close()
    _killed_before_saving(tmp_path, 6)  # newest checkpoint 4, events up to 6
    second = trainer_on(cfg, prepared_dir)
    second.resume()
    history = second.fit()
    second.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == list(range(1, 11))
    assert [e.value for e in scalars[4:]] == pytest.approx([r["loss"] for r in history], rel=1e-6)
