"""Run under torchrun by test_distributed.py: a few steps with the batches split over ranks.

argv: OUT_JSON RUN_DIR GRAD_ACCUM [KEY=VALUE ...]. Rank 0 writes the per-step losses to OUT_JSON.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[1]))  # the tests folder: trainhelpers

from prefixlm.train.config import load_config  # noqa: E402
from prefixlm.train.distributed import setup, teardown  # noqa: E402
from prefixlm.data.synthetic import make_samples  # noqa: E402
from prefixlm.train.trainer import Trainer  # noqa: E402
from trainhelpers import ListLoader, encode  # noqa: E402

DIST_CONFIG = ["model.hidden=32", "model.heads=2", "model.layers=2", "model.ffn_hidden=64",
               "model.vocab_size=258", "capacity=256", "context_size=64", "lr=1e-2",
               "warmup_steps=2", "ema_decay=0.9", "progress=false", "tensorboard=false",
               "log_every=1", "steps=4", "ckpt_every=4", "attention_backend=sdpa"]


def run(out: str, run_dir: str, grad_accum: int, dist=None, extra=()):
    dist = dist or setup("cpu")
    cfg = load_config(None, DIST_CONFIG + [f"run_dir={run_dir}", f"grad_accum={grad_accum}",
                                           *extra])
    loader = ListLoader(encode(make_samples(400, 0)), cfg.capacity, rank=dist.rank,
                        world_size=dist.world_size)
    trainer = Trainer(cfg, dist, loader)
    history = trainer.fit()
    if dist.is_main:
        Path(out).write_text(json.dumps([r["loss"] for r in history]))
    return trainer


if __name__ == "__main__":
    torch.set_num_threads(1)
    try:
        run(sys.argv[1], sys.argv[2], int(sys.argv[3]), extra=sys.argv[4:])
    finally:
        teardown()
