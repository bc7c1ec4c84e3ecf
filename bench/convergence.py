"""Convergence: one model trained with two attention backends, same seed, same batches.

Each backend gets a fresh `Trainer` (same config and seed, so the same initial weights) driven by
its own `fit()` loop (warm-up + cosine LR, clip, AdamW) over the batches of `prefixlm bench train`
(bench_spec.md's length distribution, learnable random-id data; `prefixlm.bench.spec.SpecLoader`).
The per-step losses go to JSON, both curves to a PNG (when matplotlib is installed), and the curves
are compared by this rule, with r_t = |loss_a(t) - loss_b(t)| / |loss_b(t)|, b the second backend:

  * windowed: the mean of r_t over every window of `window` (10) consecutive steps is <= step_tol
    (1e-2), i.e. the curves agree step by step up to bf16 noise, which averages out over a window;
  * final: the mean loss of the last `window` steps differs by <= final_tol (1 %).

Exit code 0 when both hold, 1 otherwise (the JSON and the plot are written either way).

    python bench/convergence.py [--steps 200] [--backends triton,flex] [--preset B] [--out DIR]
        [KEY=VALUE ...]     # train config overrides, e.g. lr=3e-4 model.kv_heads=2
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's prefixlm

from prefixlm.bench.spec import SpecLoader  # noqa: E402
from prefixlm.train.config import load_config  # noqa: E402
from prefixlm.train.distributed import setup  # noqa: E402
from prefixlm.train.trainer import Trainer, release_memory  # noqa: E402


class NoCheckpointTrainer(Trainer):
    """The Trainer as is, minus checkpoints: fit() saves at its last step, which for the B model
    would write gigabytes that nothing here reads."""

    def save(self):
        return None


def train_losses(backend: str, args) -> dict:
    """Per-step records of one run with `backend`."""
    run_dir = tempfile.mkdtemp(prefix=f"prefixlm-convergence-{backend}-")
    items = [f"model.preset={args.preset}", f"model.vocab_size={args.vocab}",
             f"capacity={args.capacity}", f"context_size={min(256, args.capacity)}",
             f"steps={args.steps}", f"compile={str(not args.no_compile).lower()}",
             f"device={args.device}", "lr=6e-4", "warmup_steps=20", "ema_decay=0",
             "progress=false", "tensorboard=false", "ckpt_every=0", f"run_dir={run_dir}",
             *args.overrides, f"attention_backend={backend}"]
    cfg = load_config(None, items)
    dist = setup(cfg.device)
    loader = SpecLoader(cfg.capacity, cfg.model.vocab_size, seed=args.seed, device=dist.device,
                        max_prefix=args.max_prefix, max_causal=args.max_causal)
    if cfg.compile:
        torch._dynamo.reset()
    started = time.perf_counter()
    trainer = NoCheckpointTrainer(cfg, dist, loader)
    try:
        history = trainer.fit()
    finally:
        trainer.close()
    elapsed = time.perf_counter() - started
    del trainer
    release_memory(dist.device)
    return dict(backend=backend, seconds=elapsed,
                loss=[r["loss"] for r in history], grad_norm=[r["grad_norm"] for r in history],
                lr=[r["lr"] for r in history], config=cfg.to_dict())


def compare(a: list[float], b: list[float], window: int = 10, step_tol: float = 1e-2,
            final_tol: float = 1e-2) -> dict:
    """The rule of the module docstring on two loss curves of equal length."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need two non-empty curves of equal length, got {len(a)} and {len(b)}")
    rel = [abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)]
    width = min(window, len(rel))
    windowed = [statistics.fmean(rel[i - width + 1:i + 1]) for i in range(width - 1, len(rel))]
    final_a, final_b = statistics.fmean(a[-width:]), statistics.fmean(b[-width:])
    final_rel = abs(final_a - final_b) / max(abs(final_b), 1e-12)
    finite = all(map(_finite, a + b))
    worst = max(range(len(windowed)), key=windowed.__getitem__)
    return dict(window=width, step_tol=step_tol, final_tol=final_tol, relative_diff=rel,
                windowed_relative_diff=windowed, max_windowed=windowed[worst],
                max_windowed_ends_at_step=worst + width, final_a=final_a, final_b=final_b,
                final_relative_diff=final_rel, finite=finite,
                ok=finite and windowed[worst] <= step_tol and final_rel <= final_tol)


def _finite(x: float) -> bool:
    return x == x and abs(x) != float("inf")


def plot(path: Path, runs: list[dict], result: dict) -> bool:
    """Both loss curves and the windowed relative difference; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True,
                                      gridspec_kw=dict(height_ratios=[3, 1]))
    for run, style in zip(runs, ("-", "--")):
        steps = range(1, len(run["loss"]) + 1)
        top.plot(steps, run["loss"], style, label=run["backend"], linewidth=1.2)
    top.set_ylabel("training loss")
    top.legend()
    verdict = "agree" if result["ok"] else "DISAGREE"
    top.set_title(f"{runs[0]['backend']} vs {runs[1]['backend']}: {verdict} "
                  f"(final {result['final_relative_diff']:.2%})")
    ends = range(result["window"], result["window"] + len(result["windowed_relative_diff"]))
    bottom.plot(ends, result["windowed_relative_diff"],
                label=f"mean |Δ|/loss over {result['window']} steps")
    bottom.axhline(result["step_tol"], color="red", linestyle=":", label="tolerance")
    bottom.set_yscale("log")
    bottom.set_xlabel("optimizer step")
    bottom.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="train config overrides")
    p.add_argument("--backends", default="triton,flex", help="two backends, comma-separated")
    p.add_argument("--preset", default="B")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--capacity", type=int, default=16384)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--seed", type=int, default=1, help="seed of the first batch's lengths")
    p.add_argument("--max-prefix", type=int, default=2048)
    p.add_argument("--max-causal", type=int, default=1024)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--step-tol", type=float, default=1e-2)
    p.add_argument("--final-tol", type=float, default=1e-2)
    p.add_argument("--out", default="bench/results", help="directory for the JSON and the PNG")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if len(backends) != 2:
        raise SystemExit(f"--backends needs exactly two backends, got {backends}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"convergence_{args.preset}_{backends[0]}_vs_{backends[1]}"
    runs = []
    for backend in backends:
        print(f"training {args.preset} with {backend}: {args.steps} steps ...", flush=True)
        runs.append(train_losses(backend, args))
        print(f"  {backend}: loss {runs[-1]['loss'][0]:.4f} -> {runs[-1]['loss'][-1]:.4f} in "
              f"{runs[-1]['seconds']:.0f} s", flush=True)
    result = compare(runs[0]["loss"], runs[1]["loss"], args.window, args.step_tol, args.final_tol)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    meta = dict(date=datetime.date.today().isoformat(), command=" ".join(sys.argv), device=device,
                torch=torch.__version__, backends=backends, preset=args.preset, steps=args.steps,
                capacity=args.capacity, seed=args.seed,
                rule=f"mean over every {result['window']}-step window of |a-b|/|b| <= "
                     f"{args.step_tol}; mean of the last {result['window']} losses within "
                     f"{args.final_tol:.0%}")
    stem.with_suffix(".json").write_text(json.dumps(
        dict(meta=meta, runs=runs, comparison=result), indent=1))
    png = stem.with_suffix(".png")
    if not plot(png, runs, result):
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        png = None
    print(f"rule: {meta['rule']}")
    print(f"max windowed |Δ|/loss {result['max_windowed']:.2e} (window ending at step "
          f"{result['max_windowed_ends_at_step']}); final {result['final_a']:.4f} vs "
          f"{result['final_b']:.4f} ({result['final_relative_diff']:.2%}): "
          f"{'PASS' if result['ok'] else 'FAIL'}")
    print(f"wrote {stem.with_suffix('.json')}" + (f" and {png}" if png else ""))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
