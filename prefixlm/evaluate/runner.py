"""Running tasks: render every task's prompts, generate their answers in batches, score them, and
collect the results (JSON-ready, HRM-Text's metric keys), a table and per-row samples."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import time

from ..model.generate import generate_batch
from .scorers import aggregate, score_row
from .tasks import Task

__all__ = ["run_tasks", "format_table", "write_samples"]


def _render(tokenizer, task: Task, docs: list[dict]) -> list[list[int]]:
    try:
        return [tokenizer.encode_prefix(doc["prompt_text"], task.condition) for doc in docs]
    except ValueError as exc:
        known = ", ".join(sorted(tokenizer.condition_ids)) or "none"
        raise ValueError(f"task {task.name}: {exc}. The {task.preset} preset renders condition "
                         f"{task.condition!r} (HRM-Text's); this tokenizer declares: {known}. "
                         "Pass --condition NAME[,NAME] or --condition none") from None


def run_task(model, tokenizer, task: Task, *, batch_size: int = 32, seed: int = 0,
             progress: bool = False, agree_tokens=None) -> tuple[dict, list[dict]]:
    """(the task's result entry, its per-row samples). agree_tokens: see generate_batch."""
    docs = task.load()
    prompts = _render(tokenizer, task, docs)
    config = task.generation.config(tokenizer.eoa_id, seed)
    started = time.perf_counter()
    outputs = generate_batch(model, prompts, config, tokenizer=tokenizer, slots=batch_size,
                             progress=progress, agree_tokens=agree_tokens)
    seconds = time.perf_counter() - started
    scores = [score_row(task.scorer, doc, out.text) for doc, out in zip(docs, outputs)]
    entry = {**task.describe(), "rows": len(docs),
             "metrics": aggregate(task.scorer, docs, scores, task.by_subject(docs)),
             "skipped_too_long": sum(out.finish_reason == "too_long" for out in outputs),
             "finish_reasons": {r: sum(out.finish_reason == r for out in outputs)
                                for r in sorted({out.finish_reason for out in outputs})},
             "prompt_tokens": sum(out.prompt_tokens for out in outputs),
             "generated_tokens": sum(len(out.ids) for out in outputs),
             "seconds": round(seconds, 3)}
    samples = [{"task": task.name, "index": i, "id": doc["id"], "prompt": doc["prompt_text"],
                "generation": out.text, "extracted": score.extracted, "gold": doc["gold"],
                "score": score.score, "invalid": score.invalid, **score.extra,
                "finish_reason": out.finish_reason, "prompt_tokens": out.prompt_tokens,
                "generated_tokens": len(out.ids)}
               for i, (doc, out, score) in enumerate(zip(docs, outputs, scores))]
    return entry, samples


def _version() -> str:
    try:
        return importlib.metadata.version("prefixlm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def run_tasks(model, tokenizer, tasks: list[Task], *, batch_size: int = 32, seed: int = 0,
              progress: bool = False, log=None, agree_tokens=None) -> tuple[dict, list[dict]]:
    """({"prefixlm_version", "created", "tasks": {name: entry}, "summary": {name: headline}},
    all samples). `log(message)` hears about each task as it finishes. agree_tokens: see
    generate_batch (processes generating together)."""
    names = [task.name for task in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"task names must differ: {', '.join(duplicates)} given twice (name them "
                         "NAME:PRESET=FILE)")
    results = {"prefixlm_version": _version(),
               "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                   timespec="seconds").replace("+00:00", "Z"),
               "tasks": {}, "summary": {}}
    samples = []
    was_training = model.training
    model.eval()
    try:
        for task in tasks:
            entry, rows = run_task(model, tokenizer, task, batch_size=batch_size, seed=seed,
                                   progress=progress, agree_tokens=agree_tokens)
            results["tasks"][task.name] = entry
            results["summary"][task.name] = entry["metrics"][task.headline]
            samples.extend(rows)
            if log is not None:
                log(f"{task.name}: {task.headline} {entry['metrics'][task.headline]:.4f} over "
                    f"{entry['rows']} rows ({entry['seconds']:.1f}s)")
    finally:
        model.train(was_training)
    return results, samples


def format_table(results: dict) -> str:
    """One line per task and metric (per-subject metrics stay in the JSON)."""
    header = ("task", "rows", "metric", "value", "invalid", "too_long", "gen_tokens", "seconds")
    lines = [header]
    for name, entry in results["tasks"].items():
        metrics = entry["metrics"]
        shown = [k for k in ("acc", "acc_wrapped", "em", "f1") if k in metrics]
        for i, key in enumerate(shown):
            first = i == 0
            subjects = sum(k.startswith("n_") for k in metrics)
            label = key + (f" (macro, {subjects} subjects)" if subjects and key == "acc" else "")
            lines.append((name if first else "", str(entry["rows"]) if first else "", label,
                          f"{metrics[key]:.4f}",
                          f"{metrics['invalid']:.4f}" if first and "invalid" in metrics else "",
                          str(entry["skipped_too_long"]) if first else "",
                          str(entry["generated_tokens"]) if first else "",
                          f"{entry['seconds']:.1f}" if first else ""))
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in lines)


def write_samples(samples: list[dict], path) -> None:
    from ..fsutil import write_bytes

    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in samples)
    write_bytes(path, text.encode("utf-8"))
