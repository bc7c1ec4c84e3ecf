"""Run times of evaluating a checkpoint on the README's local GSM8k- and MMLU-style files: through
`prefixlm eval --tasks`, through lm-eval's Python API (simple_evaluate, tasks indexed from
examples/lm_eval only) and through `prefixlm lm-eval` (lm-eval's CLI in a new process, which
also indexes lm-eval's own task library). CPU, offline. Run from the repository root.

    python bench/lm_eval_tasks.py --checkpoint runs/default [--condition none] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIXTURES = Path("tests/evaluate/fixtures")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--condition", default="none")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    rows = []

    start = time.perf_counter()
    from prefixlm.cli import main as prefixlm_main

    out = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    code = prefixlm_main(["eval", "--checkpoint", args.checkpoint, "--condition", args.condition,
                          "--max-new-tokens", "16", "--tasks",
                          f"gsm8k={FIXTURES / 'gsm8k_tiny.jsonl'}",
                          f"mmlu={FIXTURES / 'mmlu_tiny.jsonl'}", "--shots",
                          f"mmlu={FIXTURES / 'mmlu_tiny.shots.jsonl'}", "--json-out",
                          str(out / "eval.json")])
    assert code == 0
    tasks = json.loads((out / "eval.json").read_text())["tasks"]
    rows.append({"path": "prefixlm eval --tasks (in process)",
                 "seconds": time.perf_counter() - start,
                 "task_seconds": {k: v["seconds"] for k, v in tasks.items()}})

    start = time.perf_counter()
    import lm_eval
    from lm_eval.tasks import TaskManager

    import prefixlm.lmeval.adapter  # noqa: F401
    imported = time.perf_counter() - start
    manager = TaskManager(include_path="examples/lm_eval", include_defaults=False)
    for task in ("pfx_gsm8k_tiny", "pfx_mmlu_tiny"):
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model="prefixlm", model_args=f"checkpoint={args.checkpoint},condition={args.condition}",
            tasks=[task], task_manager=manager, bootstrap_iters=0, verbosity="ERROR")
        rows.append({"path": f"simple_evaluate {task}", "seconds": time.perf_counter() - start,
                     "metrics": {k: v for k, v in results["results"][task].items()
                                 if isinstance(v, float)}})
    rows.append({"path": "import lm_eval + adapter", "seconds": imported})

    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "prefixlm", "lm-eval", "--model", "prefixlm",
                           "--model_args",
                           f"pretrained={args.checkpoint},condition={args.condition}",
                           "--tasks", "pfx_gsm8k_tiny,pfx_mmlu_tiny", "--include_path",
                           "examples/lm_eval", "--output_path", str(out / "lm_eval"),
                           "--device", "cpu"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    rows.append({"path": "prefixlm lm-eval (CLI, new process)",
                 "seconds": time.perf_counter() - start})

    for row in rows:
        print(f"{row['path']:<44}{row['seconds']:>8.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
