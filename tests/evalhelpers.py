"""A tiny model that has memorised the evaluation fixtures' answers, for end-to-end evaluation
tests: `prefixlm eval --tasks` and lm-eval must then score it 1.0 where the prompts match."""

from __future__ import annotations

import json
from pathlib import Path

FIXTURES = Path(__file__).parent / "evaluate" / "fixtures"
GSM8K, MMLU, MMLU_SHOTS = (FIXTURES / "gsm8k_tiny.jsonl", FIXTURES / "mmlu_tiny.jsonl",
                           FIXTURES / "mmlu_tiny.shots.jsonl")
CONDITIONS = ["direct", "synth", "cot"]


def memorised_rows() -> list[dict]:
    """Training rows: each fixture prompt exactly as `prefixlm eval` renders it (gsm8k zero-shot,
    mmlu with its 5 same-subject shots), condition `direct`, answered with its gold answer."""
    from prefixlm.evaluate import Task

    rows = [{"instruction": d["prompt_text"], "response": str(d["gold"]), "condition": "direct"}
            for d in Task("gsm8k", "gsm8k", str(GSM8K)).load()]
    rows += [{"instruction": d["prompt_text"], "response": "ABCD"[d["gold"]],
              "condition": "direct"}
             for d in Task("mmlu", "mmlu", str(MMLU), shots=str(MMLU_SHOTS)).load()]
    return rows


def train_memoriser(root: Path) -> Path:
    """Train the tiny model on the memorised rows (about 20 s on one CPU core); its run dir."""
    from prefixlm.data.prepare import prepare_sft
    from prefixlm.train.config import load_config
    from prefixlm.train.run import run_training

    root.mkdir(parents=True, exist_ok=True)
    rows = memorised_rows()
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    prepare_sft([str(root / "train.jsonl")], str(root / "data"), context_size=1024,
                conditions=CONDITIONS, progress=False, log=lambda message: None)
    cfg = load_config(None, [f"run_dir={root / 'run'}", f"data={root / 'data'}", "steps=120",
                             "capacity=2048", "context_size=1024", "model.hidden=64",
                             "model.heads=2", "model.layers=2", "model.ffn_hidden=128",
                             "ema_decay=0", "lr=3e-3", "warmup_steps=5", "ckpt_every=0",
                             "progress=false", "tensorboard=false", "attention_backend=sdpa"])
    run_training(cfg)
    return root / "run"
