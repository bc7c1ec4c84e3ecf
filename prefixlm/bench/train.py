"""`prefixlm bench train`: training throughput of the whole stack per attention backend.

For each architecture (`transformer`; `hrm` with H_cycles 2, L_cycles 3, past its bp warm-up:
bp_steps = 5 of its 8 stack calls differentiated) and each attention backend,
a fresh `Trainer` (same seed, same config except `attention_backend`) takes `warmup` optimizer
steps, untimed (torch.compile, Triton autotuning, cuDNN graph building), then `steps` timed ones. A
step is the Trainer's own `train_step`: forward under bf16 autocast (CUDA), loss, backward, clip,
AdamW, EMA, with a device synchronisation after it, so a step time is the wall time of all of it.
Under torchrun the Trainer shards the model with FSDP2 and every rank draws its own batches.

Data: packed PrefixLM batches whose lengths come from bench_spec.md's generator (p in [16, 2048],
c in [1, 1024], drawn one sample at a time; the sample that would overflow the capacity ends the
batch). Batch i of rank r uses seed `seed + i * world_size + r`, so with seed 1 on one GPU the first
batch is the spec's. Token ids: Zipf-distributed prefixes and a learnable response (the prefix
shifted by one id, cycled), the same data `bench/convergence.py` trains on.

FLOPs per optimizer step (model FLOPs: no credit for recomputation, embedding lookups not counted),
with T = real tokens of the batch (padding excluded) and, per sample, pairs = p*p + c*p + c*(c+1)/2
(the (query, key) pairs the PrefixLM mask allows):

    FLOPs = 3 * 2 * R * N_head + sum over block calls of m * (2 * T * N_block + 4 * Hq * D * pairs)

N_block = parameters of a block's matrices (gqkv_proj, o_proj, gate_up_proj, down_proj),
N_head = vocab * hidden (LM head), R = supervised rows (the only ones the head runs on), Hq * D =
query heads x head dim, m = 3 for a call under autograd (forward + backward = 3x the forward) and
m = 1 for a call without (HRM's stack calls outside its bp_steps). A transformer is thus
6 * (T * layers * N_block + R * N_head) + 12 * layers * Hq * D * pairs. MFU = FLOPs / step time /
peak, with peak = 989e12 (H100/H200 dense bf16) per GPU unless --peak-tflops says otherwise.
Reported per (arch, backend): real tokens/s (per GPU and over all GPUs), median and mean step time,
TFLOP/s and MFU per GPU, peak memory (torch.cuda.max_memory_allocated, max over ranks), tokens/s
relative to `flex`, graphs compiled during the timed steps (should be 0) and in all (a large count
means recompiles, and past dynamo's cache limit blocks silently run eagerly: see the log).
With --profile N, N more (untimed) steps run under torch.profiler and the record gets the device
time per kernel category (attention, matmul, optimizer, ...; `bench/profile.py`) and the top kernels.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import tempfile
import time

import torch

from ..attention import SeqInfo, prefixlm_attention
from ..attention.backends import cudnn as cudnn_backend
from ..data.loader import IGNORE_INDEX
from ..extras import require
from ..model import PrefixLM
from ..model.config import bp_steps_at
from ..model.flops import step_flops, useful_pairs
from ..train.config import load_config
from ..train.distributed import all_reduce, setup
from ..train.trainer import Trainer, release_memory
from .profile import profile_steps, summary_line
from .spec import SpecLoader, package_version

__all__ = ["fa3_unavailable_reason", "run_train_bench", "bench_config", "padded_hf_batch",
           "DEFAULT_BACKENDS", "ARCHS", "HF_METHODS"]

# transformers' HrmTextForCausalLM on the same model and batches, eager, AdamW without EMA:
# "hf_padded" pads every sample to the batch's longest with SDPA and the PrefixLM mask transformers
# builds from token_type_ids (what its own path can train correctly); "hf_packed" runs the packed
# batch through prefixlm's registered attention (`import prefixlm.hf`, backend auto).
HF_METHODS = ("hf_padded", "hf_packed")

DEFAULT_BACKENDS = ("triton", "cudnn_flex", "cudnn", "flex", "sdpa", "fa3")  # fa3 only where its backward runs
ARCHS = ("transformer", "hrm")
# bp_warmup_ratio 0: every step at bp_max_steps, the state of (almost) all of a real run.
HRM_OVERRIDES = ["model.arch=hrm", "model.H_cycles=2", "model.L_cycles=3",
                 "model.bp_warmup_ratio=0"]
PEAK_TFLOPS = 989.0


# -- backends --------------------------------------------------------------------------------------
def fa3_unavailable_reason(device) -> str | None:
    """None when FlashAttention-3 imports and its backward runs here; else why not. Forward-only
    builds exist (the one the spec measured), so a tiny backward is tried, not just the import."""
    try:
        import flash_attn_interface  # noqa: F401
    except ImportError as exc:
        return f"flash_attn_interface is not importable ({exc})"
    if torch.device(device).type != "cuda":
        return "FlashAttention-3 needs CUDA"
    try:
        info = SeqInfo.from_lengths([40, 24], [24, 0], capacity=96, device=device)
        q, k, v = (torch.randn(96, 2, 128, device=device, dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        out = prefixlm_attention(q, k, v, info, backend="fa3")
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            return "FA3 backward gave non-finite gradients on a tiny batch"
    except Exception as exc:  # a forward-only build fails in many ways; any of them disqualifies
        return f"FA3 backward does not run: {type(exc).__name__}: {str(exc)[:200]}"
    return None


# -- the benchmark ---------------------------------------------------------------------------------
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def _cudnn_graphs() -> int:
    return cudnn_backend.graph_cache_info()["graphs"]


def _reduce(values: list[float], op: str) -> list[float]:
    return all_reduce(torch.tensor(values, dtype=torch.float64), op).tolist()


def _run_one(cfg, dist, loader_kwargs, steps: int, warmup: int, peak: float,
             profile: int = 0, trace: str | None = None) -> dict:
    """Warm-up then timed optimizer steps of one fresh Trainer, then `profile` profiled ones (not
    timed: the profiler slows the host; their Chrome trace goes to `trace` if given); the
    record's measured fields."""
    device = dist.device
    loader = SpecLoader(cfg.capacity, cfg.model.vocab_size, rank=dist.rank,
                        world_size=dist.world_size, device=device, **loader_kwargs)
    # Batches are built before timing (a real loader prefetches them on a thread).
    batches = [loader.batch(i) for i in range(warmup + steps + profile)]
    graphs_before = _unique_graphs()
    trainer = Trainer(cfg, dist, loader)
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        for batch in batches[:warmup]:
            trainer.train_step([batch])
        _sync(device)
        warmup_s = time.perf_counter() - started
        graphs, cudnn_graphs = _unique_graphs(), _cudnn_graphs()
        times, losses, tokens, flops = [], [], 0, 0.0
        for batch in batches[warmup:warmup + steps]:
            start = time.perf_counter()
            stats = trainer.train_step([batch])
            _sync(device)
            times.append(time.perf_counter() - start)
            losses.append(stats["loss"])
            tokens += batch.info.total
            flops += step_flops(cfg.model, batch.info.total, useful_pairs(batch.info),
                                len(batch.supervised_rows), stats["bp_steps"])
        elapsed = sum(times)
        peak_mem = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
                    else None)
        # Ranks run in lockstep (the step's all-reduces): one wall time, tokens and FLOPs summed.
        all_tokens, all_flops, all_elapsed = _reduce([tokens, flops, elapsed], "sum")
        world = dist.world_size
        record = dict(
            params=trainer.model.num_params(non_embedding=False),
            tokens_per_step=all_tokens / steps / world,
            pairs_per_step=statistics.mean(useful_pairs(b.info)
                                           for b in batches[warmup:warmup + steps]),
            step_ms_median=statistics.median(times) * 1e3,
            step_ms_mean=all_elapsed / world / steps * 1e3,
            tokens_per_s=all_tokens / (all_elapsed / world),
            tokens_per_s_per_gpu=all_tokens / all_elapsed,
            tflops_per_gpu=all_flops / all_elapsed / 1e12,
            mfu=all_flops / all_elapsed / peak,
            peak_mem_gib=(_reduce([peak_mem], "max")[0] if peak_mem is not None else None),
            warmup_s=warmup_s,
            loss_first=losses[0], loss_last=losses[-1],
            graphs_compiled_during_timing=_unique_graphs() - graphs,
            graphs_compiled_total=_unique_graphs() - graphs_before,
            cudnn_graphs_built_during_timing=_cudnn_graphs() - cudnn_graphs,
        )
        if profile:
            record["profile"] = profile_steps(lambda b: trainer.train_step([b]),
                                              batches[warmup + steps:], device, trace=trace)
        return record
    finally:
        trainer.close()
        trainer = None  # the model and optimizer go before the allocator's cache is emptied
        release_memory(device)


def padded_hf_batch(batch) -> dict:
    """Keyword arguments of `HrmTextForCausalLM.forward` for the samples of a packed `Batch`, one
    per row, padded to the longest: input_ids, attention_mask, token_type_ids (1 on the prefix),
    position_ids and aligned shift_labels ("labels" switches the loss on)."""
    info = batch.info
    prefix, causal = info.prefix_host(), info.causal_host()
    lens = prefix + causal
    width = int(lens.max())
    starts = torch.as_tensor(lens).cumsum(0) - torch.as_tensor(lens)
    pos = torch.arange(width)
    real = pos[None, :] < torch.as_tensor(lens)[:, None]
    gather = (starts[:, None] + pos[None, :]).clamp(max=info.total - 1).to(batch.inputs.device)
    real = real.to(batch.inputs.device)
    ids = torch.where(real, batch.inputs[gather], 0)
    labels = torch.where(real, batch.labels[gather], IGNORE_INDEX)
    prefix_mask = (pos[None, :] < torch.as_tensor(prefix)[:, None]).to(real.device)
    return {"input_ids": ids, "attention_mask": real.long(), "token_type_ids": prefix_mask.long(),
            "position_ids": pos[None, :].expand_as(ids).to(ids.device), "labels": labels,
            "shift_labels": labels, "use_cache": False}


def _hf_model(cfg, device, method: str):
    """transformers' HrmTextForCausalLM with the weights `PrefixLM(cfg.model)` starts from."""
    transformers = require("transformers", "hf", "the transformers baseline of bench train")
    from ..hf import save_pretrained  # registers attn_implementation="prefixlm"

    torch.manual_seed(cfg.seed)
    ours = PrefixLM(cfg.model)
    with tempfile.TemporaryDirectory(prefix="prefixlm-bench-hf-") as tmp:
        save_pretrained(ours, f"{tmp}/model")
        attn = "sdpa" if method == "hf_padded" else "prefixlm"
        model = transformers.AutoModelForCausalLM.from_pretrained(
            f"{tmp}/model", attn_implementation=attn, dtype=torch.float32)
    return model.to(device).train()


def _run_hf(cfg, dist, loader_kwargs, steps: int, warmup: int, peak: float, method: str) -> dict:
    """`_run_one` for transformers' model: the same batches, AdamW with the run's settings, the
    gradient clipped, bf16 autocast on CUDA; no EMA, no compile (as a user runs it)."""
    if dist.distributed:
        raise NotImplementedError("the transformers baselines run on one GPU")
    device = dist.device
    loader = SpecLoader(cfg.capacity, cfg.model.vocab_size, device=device, **loader_kwargs)
    batches = [loader.batch(i) for i in range(warmup + steps)]
    model = _hf_model(cfg, device, method)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  eps=cfg.eps, weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else torch.autocast("cpu", enabled=False))

    def step(batch) -> float:
        if method == "hf_padded":
            kwargs = padded_hf_batch(batch)
        else:
            kwargs = {"input_ids": batch.inputs[None], "position_ids": batch.position_ids[None],
                      "prefixlm_info": batch.info, "labels": batch.labels[None],
                      "shift_labels": batch.labels[None], "use_cache": False}
        with autocast:
            loss = model(**kwargs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        for batch in batches[:warmup]:
            step(batch)
        _sync(device)
        warmup_s = time.perf_counter() - started
        bp = bp_steps_at(cfg.model, cfg.steps, cfg.steps)  # past the warm-up, as HRM_OVERRIDES
        times, losses, tokens, flops = [], [], 0, 0.0
        for batch in batches[warmup:]:
            start = time.perf_counter()
            losses.append(step(batch))
            _sync(device)
            times.append(time.perf_counter() - start)
            tokens += batch.info.total
            flops += step_flops(cfg.model, batch.info.total, useful_pairs(batch.info),
                                len(batch.supervised_rows), bp)
        elapsed = sum(times)
        return dict(
            params=sum(p.numel() for p in model.parameters()),
            tokens_per_step=tokens / steps, step_ms_median=statistics.median(times) * 1e3,
            step_ms_mean=elapsed / steps * 1e3, tokens_per_s=tokens / elapsed,
            tokens_per_s_per_gpu=tokens / elapsed, tflops_per_gpu=flops / elapsed / 1e12,
            mfu=flops / elapsed / peak,
            peak_mem_gib=(torch.cuda.max_memory_allocated(device) / 2**30
                          if device.type == "cuda" else None),
            warmup_s=warmup_s, loss_first=losses[0], loss_last=losses[-1],
            graphs_compiled_during_timing=0)
    finally:
        model = optimizer = None
        release_memory(device)


def bench_config(preset: str, capacity: int, vocab: int, compile_: bool, device: str, arch: str,
            backend: str, overrides: list[str], run_dir: str):
    items = [f"model.preset={preset}", f"model.vocab_size={vocab}", f"capacity={capacity}",
             f"context_size={min(256, capacity)}", f"compile={str(compile_).lower()}",
             f"device={device}", "lr=3e-4", "warmup_steps=1", "progress=false",
             "tensorboard=false", "ckpt_every=0", f"run_dir={run_dir}"]
    if arch == "hrm":
        items += HRM_OVERRIDES
    items += [*overrides, f"attention_backend={backend}"]
    return load_config(None, items)


def run_train_bench(*, preset: str = "L", capacity: int = 16384, steps: int = 20,
                    warmup: int = 3, backends=DEFAULT_BACKENDS, archs=ARCHS, compile_: bool = True,
                    vocab: int = 32768, seed: int = 1, zero_causal_frac: float = 0.0,
                    max_prefix: int = 2048, max_causal: int = 1024, device: str = "auto",
                    peak_tflops: float = PEAK_TFLOPS, overrides=(), json_path: str | None = None,
                    command: str = "", profile: int = 0,
                    trace_dir: str | None = None) -> list[dict]:
    """Benchmark every (arch, backend); prints records as they come and a table at the end; rank 0
    writes the JSON after every record (a run cut short keeps what it measured). Under torchrun,
    call it on every rank."""
    if steps < 1 or warmup < 0 or profile < 0:
        raise ValueError(f"need steps >= 1, warmup >= 0 and profile >= 0, got steps={steps}, "
                         f"warmup={warmup}, profile={profile}")
    if trace_dir and not profile:
        raise ValueError("a trace records the profiled steps: give profile >= 1 with trace_dir")
    for arch in archs:
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose from {ARCHS}")
    dist = setup(device)
    say = print if dist.is_main else (lambda *a, **k: None)
    loader_kwargs = dict(seed=seed, zero_causal_frac=zero_causal_frac, max_prefix=max_prefix,
                         max_causal=max_causal)
    run_dir = tempfile.mkdtemp(prefix="prefixlm-bench-train-")  # the Trainer writes nothing here
    fa3_reason = fa3_unavailable_reason(dist.device) if "fa3" in backends else None
    meta = dict(date=datetime.date.today().isoformat(), command=command,
                device=(torch.cuda.get_device_name(dist.device) if dist.device.type == "cuda"
                        else "cpu"),
                torch=torch.__version__, triton=package_version("triton"), world_size=dist.world_size,
                preset=preset, capacity=capacity, steps=steps, warmup=warmup, compile=compile_,
                vocab=vocab, seed=seed, zero_causal_frac=zero_causal_frac, max_prefix=max_prefix,
                max_causal=max_causal, peak_tflops=peak_tflops, overrides=list(overrides),
                profile_steps=profile,
                hrm=HRM_OVERRIDES, fa3=fa3_reason or "backward runs",
                flops="3*2*R*N_head (R: supervised rows) + sum over block calls "
                      "m*(2*T*N_block + 4*Hq*D*pairs), m=3 with autograd, 1 without; "
                      "pairs = sum p*p + c*p + c*(c+1)/2")
    say(f"prefixlm bench train: preset {preset}, {capacity} tokens per GPU, {warmup} warm-up + "
        f"{steps} timed steps, compile={compile_}, {dist.world_size} x {meta['device']}",
        flush=True)
    records = []
    for arch in archs:
        for backend in backends:
            rec = dict(arch=arch, backend=backend, world_size=dist.world_size, error=None)
            if backend == "fa3" and fa3_reason:
                rec["error"] = f"skipped: {fa3_reason}"
            else:
                cfg = bench_config(preset, capacity, vocab, compile_, dist.device.type, arch,
                                   "auto" if backend in HF_METHODS else backend, list(overrides),
                                   run_dir)
                if compile_:
                    torch._dynamo.reset()  # every backend compiles afresh, under the same limits
                trace = None
                if trace_dir:
                    os.makedirs(trace_dir, exist_ok=True)
                    trace = os.path.join(trace_dir,
                                         f"{arch}_{backend}_rank{dist.rank}.json.gz")
                try:
                    if backend in HF_METHODS:
                        rec.update(_run_hf(cfg, dist, loader_kwargs, steps, warmup,
                                           peak_tflops * 1e12, backend))
                    else:
                        rec.update(_run_one(cfg, dist, loader_kwargs, steps, warmup,
                                            peak_tflops * 1e12, profile, trace))
                except Exception as exc:  # report and go on: one backend must not hide the rest
                    rec["error"] = f"{type(exc).__name__}: {exc}"[:400]
                # Out of the except block: its traceback no longer holds the failed run's tensors.
                release_memory(dist.device)
            records.append(rec)
            _add_ratios(records)
            say(_line(rec), flush=True)
            if rec.get("profile"):
                say(f"    profile: {summary_line(rec['profile'])}", flush=True)
            if json_path and dist.is_main:
                with open(json_path, "w") as fh:
                    json.dump(dict(meta=meta, records=records), fh, indent=1)
    say(_table(records), flush=True)
    if any(r.get("profile") for r in records):
        say(_profile_table(records), flush=True)
    return records


def _add_ratios(records):
    """tokens/s relative to Flex and to transformers' padded baseline of the same arch."""
    for reference in ("flex", "hf_padded"):
        base = {r["arch"]: r.get("tokens_per_s") for r in records
                if r["backend"] == reference and not r["error"]}
        for r in records:
            value = base.get(r["arch"])
            r[f"vs_{reference}"] = (r["tokens_per_s"] / value if value and not r["error"]
                                    else None)


def _line(r) -> str:
    if r["error"]:
        return f"  {r['arch']:<11} {r['backend']:<9} n/a ({r['error']})"
    mem = f"{r['peak_mem_gib']:.1f} GiB" if r["peak_mem_gib"] is not None else "n/a"
    return (f"  {r['arch']:<11} {r['backend']:<9} {r['tokens_per_s_per_gpu']:>10.0f} tok/s/GPU  "
            f"{r['step_ms_median']:8.1f} ms/step  MFU {100 * r['mfu']:5.1f}%  {mem}  "
            f"(warm-up {r['warmup_s']:.0f} s, loss {r['loss_first']:.3f} -> {r['loss_last']:.3f}, "
            f"recompiles {r['graphs_compiled_during_timing']})")


def _fmt(value, spec, scale=1.0):
    return "n/a" if value is None else format(value * scale, spec)


def _table(records) -> str:
    rows = ["", "| arch | backend | tokens/s per GPU | step ms (median) | TFLOP/s per GPU | MFU | "
                "peak mem GiB | vs flex | vs hf_padded |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if r["error"]:
            rows.append(f"| {r['arch']} | {r['backend']} | n/a | n/a | n/a | n/a | n/a | n/a | "
                        f"n/a |")
            continue
        ratios = " | ".join(f"{_fmt(r[key], '.2f')}{'x' if r[key] else ''}"
                            for key in ("vs_flex", "vs_hf_padded"))
        rows.append(f"| {r['arch']} | {r['backend']} | {r['tokens_per_s_per_gpu']:.0f} | "
                    f"{r['step_ms_median']:.1f} | {r['tflops_per_gpu']:.0f} | "
                    f"{100 * r['mfu']:.1f}% | {_fmt(r['peak_mem_gib'], '.1f')} | {ratios} |")
    return "\n".join(rows)


def _profile_table(records) -> str:
    """Per-step ms by kernel category (columns: every category any profile has, largest first)."""
    profiled = [r for r in records if r.get("profile")]
    totals: dict[str, float] = {}
    for r in profiled:
        for name, ms in r["profile"]["categories"].items():
            totals[name] = totals.get(name, 0.0) + ms
    names = sorted(totals, key=lambda n: -totals[n])
    timeline = ("gpu_busy_ms", "gpu_idle_ms", "gpu_overlap_ms")
    shown = [key for key in timeline if all(key in r["profile"] for r in profiled)]
    rows = ["", f"Profile ({profiled[0]['profile']['clock']}, ms per step):", "",
            "| arch | backend | total | " + " | ".join(names)
            + "".join(f" | GPU {key[4:-3]}" for key in shown) + " |",
            "|---|---|---|" + "---|" * (len(names) + len(shown))]
    for r in profiled:
        cats = r["profile"]["categories"]
        rows.append(f"| {r['arch']} | {r['backend']} | {r['profile']['ms_per_step']:.1f} | "
                    + " | ".join(f"{cats.get(n, 0.0):.1f}" for n in names)
                    + "".join(f" | {r['profile'][key]:.1f}" for key in shown)
                    + " |")
    for r in profiled:
        prof = r["profile"]
        if prof.get("gaps"):
            rows += ["", f"{r['arch']} / {r['backend']}: largest GPU idle gaps (ms per step, between "
                     "the kernel before and the one after)"]
            rows += [f"  {ms:7.3f} ms  {count:6.1f}x  {before}  ->  {after}"
                     for before, after, count, ms in prof["gaps"]]
        if prof.get("host_waits"):
            rows.append("  host's blocking CUDA calls per step: " + ", ".join(
                f"{name} {count:g}x {ms:.2f} ms" for name, (count, ms) in prof["host_waits"].items()))
    return "\n".join(rows)
