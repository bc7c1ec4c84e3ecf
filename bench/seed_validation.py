"""The seed's validation on our stack: zero-causal batches, deterministic backward, K/V rows.

Three checks per attention backend (default: every training backend; fa3 only where its backward
runs):

  zero_causal_run      a short training run (the Trainer's own train_step, bf16 autocast on CUDA,
                       eager unless --compile) in which every `--zero-every`-th batch has no causal
                       token in any sample; every loss and gradient norm is finite and the run
                       steps on past those batches.
  deterministic        forward + backward of the attention `--repeats` times on identical inputs
                       with deterministic=True give bitwise equal outputs and gradients (required
                       for the backends that document a deterministic backward: triton, cudnn, fa3;
                       reported for the others).
  zero_causal_kv_grad  on a batch mixing zero-causal samples (bench_spec.md case E by default:
                       65536 rows, 12/12 heads, D 128, zero_causal_frac 0.3, seed 1), the dK and dV
                       rows of the zero-causal samples match the fp32 reference by the
                       FlashAttention rule of `prefixlm.attention.verify` (the whole output and
                       gradients are measured and reported too, but they are `prefixlm verify`'s
                       job).

Prints a table, writes JSON (--json, rewritten after every check), exit code 1 if a required check
fails. CPU: use sdpa/reference with --dtype fp32 and small shapes (the tests do).

    python bench/seed_validation.py [--backends triton,cudnn,flex,sdpa,fa3] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's prefixlm

from prefixlm.attention import SeqInfo, prefixlm_attention  # noqa: E402
from prefixlm.attention.reference import reference_attention  # noqa: E402
from prefixlm.attention.verify import error_stat  # noqa: E402
from prefixlm.bench.spec import SpecLoader, spec_lengths  # noqa: E402
from prefixlm.bench.train import fa3_unavailable_reason  # noqa: E402

DETERMINISTIC = ("triton", "cudnn", "fa3")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# -- attention checks ------------------------------------------------------------------------------
def mixed_case(args, device):
    """(q, k, v, dout, info) of the spec-style batch with zero-causal samples mixed in."""
    prefix, causal = spec_lengths(args.capacity, args.seed, args.zero_causal_frac,
                                  args.max_prefix, args.max_causal)
    info = SeqInfo.from_lengths(prefix, causal, capacity=args.capacity, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[args.dtype]

    def randn(heads):
        return torch.randn(args.capacity, heads, args.head_dim, generator=g, device=device,
                           dtype=dtype)

    return randn(args.heads), randn(args.kv_heads), randn(args.kv_heads), randn(args.heads), info


def _forward_backward(fn, q, k, v, dout, dtype):
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, dout.to(out.dtype))
    return [out.detach(), *grads]


def zero_causal_rows(info) -> torch.Tensor:
    """Packed row indices of every sample without causal tokens."""
    prefix, causal = info.host_lens.numpy()
    lengths = prefix + causal
    starts = np.cumsum(lengths) - lengths
    rows = [np.arange(s, s + n) for s, n, c in zip(starts, lengths, causal) if c == 0 and n]
    return torch.from_numpy(np.concatenate(rows) if rows else np.zeros(0, np.int64))


def check_deterministic(backend, case, repeats: int) -> dict:
    q, k, v, dout, info = case

    def run():
        return _forward_backward(lambda *t: prefixlm_attention(*t, info, backend=backend,
                                                               deterministic=True),
                                 q, k, v, dout, q.dtype)

    first = run()
    mismatched = []
    for i in range(1, repeats):
        again = run()
        mismatched += [f"{name} (run {i + 1})" for name, a, b in
                       zip(("out", "dq", "dk", "dv"), first, again) if not torch.equal(a, b)]
    ok = not mismatched
    return dict(ok=ok, detail=f"{repeats} runs bitwise equal" if ok else
                "differ: " + ", ".join(mismatched[:8]))


def check_zero_causal_kv(backend, case, reference=None) -> dict:
    q, k, v, dout, info = case
    rows = zero_causal_rows(info).to(q.device)
    if len(rows) == 0:
        return dict(ok=False, detail="the batch has no zero-causal sample: raise "
                                     "--zero-causal-frac")
    if reference is None:
        reference = reference_grads(case)
    oracle, torch_same = reference
    fast = _forward_backward(lambda *t: prefixlm_attention(*t, info, backend=backend),
                             q, k, v, dout, q.dtype)
    rows_stats = [error_stat(f"{name}[zero-causal rows]", f.index_select(0, rows),
                             o.index_select(0, rows), t.index_select(0, rows), len(rows))
                  for name, f, o, t in zip(("dk", "dv"), fast[2:], oracle[2:], torch_same[2:])]
    # The whole tensors are `prefixlm verify`'s job; reported here, not part of this check.
    whole = [error_stat(name, f, o, t, info.total)
             for name, f, o, t in zip(("out", "dq", "dk", "dv"), fast, oracle, torch_same)]
    samples = int((info.host_lens[1, :info.num_samples] == 0).sum())
    whole_ok = all(s.ok for s in whole)
    return dict(ok=all(s.ok for s in rows_stats), whole_tensors_ok=whole_ok,
                detail=f"{samples} zero-causal samples ({len(rows)} rows) of {info.num_samples}; "
                       + "; ".join(str(s) for s in rows_stats)
                       + ("; whole tensors within the rule" if whole_ok else
                          "; whole tensors (informational) outside the rule: "
                          + "; ".join(str(s) for s in whole if not s.ok)))


def reference_grads(case):
    """(oracle, same-dtype reference) outputs and gradients, built as testing.check_backend does."""
    q, k, v, dout, info = case
    oracle_dtype = torch.float64 if q.dtype in (torch.float32, torch.float64) else torch.float32

    def ref(dtype):
        return _forward_backward(lambda *t: reference_attention(*t, info, None, dtype),
                                 q, k, v, dout, dtype)

    return ref(oracle_dtype), ref(q.dtype)


# -- the training run ------------------------------------------------------------------------------
def check_zero_causal_run(backend, args, device) -> dict:
    from prefixlm.train.config import load_config
    from prefixlm.train.distributed import Dist
    from prefixlm.train.trainer import NonFiniteLossError, Trainer, release_memory

    compile_ = args.compile
    cfg = load_config(None, [
        f"model.preset={args.run_preset}", f"model.vocab_size={args.vocab}",
        f"capacity={args.run_capacity}", f"context_size={min(256, args.run_capacity)}",
        f"compile={str(compile_).lower()}", f"device={device.type}", "lr=3e-4",
        "warmup_steps=1", "progress=false", "tensorboard=false", "ckpt_every=0",
        f"run_dir={tempfile.mkdtemp(prefix='prefixlm-seed-validation-')}",
        f"attention_backend={backend}"])
    loader = SpecLoader(cfg.capacity, cfg.model.vocab_size, seed=args.seed, device=device,
                        max_prefix=args.max_prefix, max_causal=args.max_causal,
                        all_zero_causal_every=args.zero_every)
    if compile_:
        torch._dynamo.reset()
    trainer = Trainer(cfg, Dist(0, 1, 0, device), loader)
    steps = []
    try:
        for index in range(args.run_steps):
            batch = loader.batch(index)
            zero = batch.info.max_causal == 0
            if zero != loader.is_all_zero_causal(index):
                return dict(ok=False, detail=f"batch {index} is not what the schedule says")
            try:
                stats = trainer.train_step([batch])
            except NonFiniteLossError as exc:
                return dict(ok=False, detail=f"step {index + 1} (all zero-causal: {zero}): {exc}",
                            steps=steps)
            steps.append(dict(step=index + 1, all_zero_causal=zero, loss=stats["loss"],
                              grad_norm=stats["grad_norm"],
                              supervised_tokens=stats["tokens"]))
    finally:
        trainer.close()
        del trainer
        release_memory(device)
    zero_steps = [s["step"] for s in steps if s["all_zero_causal"]]
    crossed = bool(zero_steps) and zero_steps[0] < steps[-1]["step"]
    finite = all(math.isfinite(s["loss"]) and math.isfinite(s["grad_norm"]) for s in steps)
    ok = crossed and finite
    detail = (f"{len(steps)} steps, all-zero-causal batches at steps {zero_steps}, losses "
              + ", ".join(f"{s['loss']:.3f}" for s in steps))
    if not crossed:
        detail += "; no step after an all-zero-causal batch: raise --run-steps"
    return dict(ok=ok, detail=detail, steps=steps)


# -- driver ----------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="triton,cudnn,flex,sdpa,fa3")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--checks", default="zero_causal_run,deterministic,zero_causal_kv_grad")
    # The attention batch (defaults: bench_spec.md case E).
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default bf16 on CUDA, fp32 on CPU")
    p.add_argument("--capacity", type=int, default=65536)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--zero-causal-frac", type=float, default=0.3)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-prefix", type=int, default=2048)
    p.add_argument("--max-causal", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=2, help="runs compared in `deterministic`")
    # The training run.
    p.add_argument("--run-preset", default="B")
    p.add_argument("--run-capacity", type=int, default=16384)
    p.add_argument("--run-steps", type=int, default=7)
    p.add_argument("--zero-every", type=int, default=2,
                   help="every N-th batch of the run is all zero-causal")
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--compile", action="store_true",
                   help="compile the blocks in the run (prefixlm train's default is eager)")
    p.add_argument("--json", default=None, metavar="PATH")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.repeats < 2:
        raise SystemExit("--repeats must be >= 2")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    meta = dict(date=datetime.date.today().isoformat(), command=" ".join(sys.argv),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                torch=torch.__version__, args=vars(args))
    results = []
    case = reference = None
    if {"deterministic", "zero_causal_kv_grad"} & set(checks):
        case = mixed_case(args, device)
    print(f"seed validation on {meta['device']}: backends {backends}, checks {checks}", flush=True)
    for backend in backends:
        skip = fa3_unavailable_reason(device) if backend == "fa3" else None
        for check in checks:
            rec = dict(check=check, backend=backend,
                       required=check != "deterministic" or backend in DETERMINISTIC)
            if skip:
                rec.update(ok=None, detail=f"skipped: {skip}")
            else:
                try:
                    if check == "zero_causal_run":
                        rec.update(check_zero_causal_run(backend, args, device))
                    elif check == "deterministic":
                        rec.update(check_deterministic(backend, case, args.repeats))
                    elif check == "zero_causal_kv_grad":
                        if reference is None:
                            reference = reference_grads(case)
                        rec.update(check_zero_causal_kv(backend, case, reference))
                    else:
                        raise SystemExit(f"unknown check {check!r}")
                except (NotImplementedError, ImportError) as exc:  # backend cannot run here
                    rec.update(ok=None, detail=f"skipped: {exc}"[:400])
                except Exception as exc:
                    rec.update(ok=False, detail=f"{type(exc).__name__}: {exc}"[:400])
            results.append(rec)
            verdict = ("skipped" if rec["ok"] is None else "pass" if rec["ok"] else
                       "FAIL" if rec["required"] else "fail (not required)")
            print(f"  {check:<20} {backend:<9} {verdict:<20} {rec['detail']}", flush=True)
            if args.json:
                with open(args.json, "w") as fh:
                    json.dump(dict(meta=meta, results=results), fh, indent=1)
    failed = [r for r in results if r["ok"] is False and r["required"]]
    ran = [r for r in results if r["ok"] is not None]
    print(f"{len(ran)} checks ran, {len(failed)} required failed, "
          f"{len(results) - len(ran)} skipped")
    return 1 if failed or not ran else 0


if __name__ == "__main__":
    sys.exit(main())
