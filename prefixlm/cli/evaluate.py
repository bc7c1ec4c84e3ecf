"""`prefixlm eval --tasks ...` (task evaluation as HRM-Text scores it) and `prefixlm lm-eval ...`
(lm-evaluation-harness with the prefixlm model registered)."""

from __future__ import annotations

import sys

__all__ = ["register", "add_task_arguments", "run_task_eval"]


def add_task_arguments(parser) -> None:
    """The `eval` arguments of task evaluation (`--tasks` and what goes with it)."""
    group = parser.add_argument_group(
        "task evaluation (HRM-Text's benchmarks on local files; see README, Evaluation)")
    group.add_argument("--tasks", nargs="+", metavar="SPEC",
                       help="PRESET=FILE, NAME:PRESET=FILE or TASK.yaml; presets: gsm8k, math, "
                            "drop, mmlu, arc, hellaswag, winogrande, boolq, exact, boxed, mcq, f1")
    group.add_argument("--shots", action="append", metavar="TASK=FILE",
                       help="few-shot rows of a task (same format as its data)")
    group.add_argument("--num-shots", action="append", metavar="TASK=K",
                       help="shots per prompt (default: the preset's)")
    group.add_argument("--condition", metavar="NAME[,NAME]|none",
                       help="condition tokens for every task instead of the presets' "
                            "(HRM-Text's: synth,cot for gsm8k/math, direct for the others)")
    group.add_argument("--max-context", type=int, metavar="N",
                       help="override the presets' cap (prompts of N tokens or more are skipped)")
    group.add_argument("--max-new-tokens", type=int, metavar="N",
                       help="answers of at most N tokens (a cap on the presets' budgets; MCQ "
                            "presets answer in one token)")
    group.add_argument("--temperature", type=float, help="override (presets: 0, greedy)")
    group.add_argument("--top-p", type=float, help="override (presets: 1)")
    group.add_argument("--stop", action="append", metavar="TEXT",
                       help="stop string for every task (repeatable)")
    group.add_argument("--limit", type=int, default=0, metavar="N", help="first N rows per task")
    group.add_argument("--batch-size", type=int, default=32, metavar="N",
                       help="prompts decoded together")
    group.add_argument("--seed", type=int, default=0, help="sampling seed (temperature > 0)")
    group.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                       help="weights' dtype for generation (auto: bfloat16 on CUDA)")
    group.add_argument("--json-out", metavar="FILE", help="write the results as JSON")
    group.add_argument("--samples-out", metavar="FILE", help="write every row's answer (JSONL)")


def _per_task(items, what: str, kind) -> dict:
    out = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ValueError(f"{what} {item!r}: expected TASK=VALUE")
        try:
            out[name] = kind(value)
        except ValueError:
            raise ValueError(f"{what} {item!r}: {value!r} is not a {kind.__name__}") from None
    return out


def _tasks_from(args) -> list:
    from ..evaluate.tasks import parse_task_spec

    tasks = [parse_task_spec(spec) for spec in args.tasks]
    names = {task.name for task in tasks}
    shots = _per_task(args.shots, "--shots", str)
    num_shots = _per_task(args.num_shots, "--num-shots", int)
    for what, values in (("--shots", shots), ("--num-shots", num_shots)):
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"{what}: no task named {', '.join(unknown)} (tasks: "
                             f"{', '.join(sorted(names))})")
    for task in tasks:
        task.shots = shots.get(task.name, task.shots)
        task.num_shots = num_shots.get(task.name, task.num_shots)
        if args.condition is not None:
            task.condition = "" if args.condition in ("", "none") else args.condition
        if args.limit:
            task.limit = args.limit
        generation = task.generation
        for key in ("max_context", "temperature", "top_p"):
            if getattr(args, key) is not None:
                setattr(generation, key, getattr(args, key))
        if args.max_new_tokens is not None:
            generation.cap_new_tokens(args.max_new_tokens)
        if args.stop:
            generation.stop = tuple(args.stop)
    return tasks


def run_task_eval(args, load, device: str) -> int:
    """`eval --tasks`: `load(device)` gives (model, run config, tokenizer, checkpoint dir)."""
    import json

    import torch

    from ..evaluate import format_table, run_tasks, write_samples
    from ..fsutil import write_json

    if args.data is not None:
        raise ValueError("--tasks and --data are two kinds of evaluation: give one")
    tasks = _tasks_from(args)
    model, cfg, tokenizer, ckpt = load(device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)
    model = model.to(dtype)
    say = print if not args.json else (lambda *a, **k: print(*a, file=sys.stderr, **k))
    results, samples = run_tasks(model, tokenizer, tasks, batch_size=args.batch_size,
                                 seed=args.seed, progress=True, log=say)
    results = {"prefixlm_version": results.pop("prefixlm_version"),
               "checkpoint": str(ckpt),
               "weights": "ema" if not args.no_ema and cfg.use_ema and cfg.ema_decay > 0
               else "raw",
               "device": str(device), "dtype": str(dtype).removeprefix("torch."),
               "attention_backend": args.attention_backend, "batch_size": args.batch_size,
               **results}
    if args.json_out:
        write_json(args.json_out, results)
    if args.samples_out:
        write_samples(samples, args.samples_out)
    if args.json:
        print(json.dumps(results))
    else:
        print(format_table(results))
        for path in filter(None, (args.json_out, args.samples_out)):
            print(f"wrote {path}")
    return 0


def _lm_eval(args) -> int:
    """lm-eval's own command line, with the `prefixlm` model registered first."""
    from ..extras import require

    require("lm_eval", "lmeval", "prefixlm lm-eval")
    from ..lmeval import adapter  # noqa: F401  (registers --model prefixlm)

    harness = require("lm_eval.__main__", "lmeval", "prefixlm lm-eval")
    argv = list(args.lm_eval_args)
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        harness.cli_evaluate()
    except SystemExit as exc:  # lm-eval's parser and its exit codes
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "lm-eval", help="run lm-evaluation-harness with --model prefixlm available",
        description="lm-evaluation-harness's command line (lm_eval ...), with the prefixlm model "
                    "registered: prefixlm lm-eval --model prefixlm --model_args "
                    "checkpoint=RUN_DIR --tasks TASKS [--include_path DIR] ... Every argument "
                    "goes to lm-eval (`prefixlm lm-eval --help` shows its help).",
        add_help=False)
    p.set_defaults(func=_lm_eval, lm_eval_args=[])
