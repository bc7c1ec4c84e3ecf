"""Where a training step's time goes: device time per kernel category, from `torch.profiler`.

Used by `prefixlm bench train --profile N` to explain a throughput figure (issue: a missed target
is reported with a profile). On CUDA the categories sum the kernels' own device time; on the CPU,
where there are no kernels, they sum the operators' self CPU time. Kernel names are matched, first
pattern wins; the top kernels are kept verbatim so a misfiled name is visible in the JSON.

On CUDA the profile also gives the GPU's timeline per step: `gpu_busy_ms` (time some kernel runs:
the union of all kernels' intervals, any stream), `gpu_span_ms` (first kernel start to last kernel
end), `gpu_idle_ms` (span - busy: the GPU waits, e.g. for the host) and `gpu_overlap_ms` (kernel
time - busy: kernels running side by side on two streams). The profiler slows the host, so idle
time here is an upper bound of the idle time of an unprofiled step. To say where that idle time
sits, `gaps` lists the largest idle stretches by the pair of kernels around them (the host work
between those two launches is the suspect), and `host_waits` the host's CUDA calls that block
(synchronize, malloc/free, blocking copies) with their count and host time per step.
"""

from __future__ import annotations

import re

import torch
from torch.autograd import DeviceType

# Order matters: attention kernels also contain "cutlass" / "gemm"-like words (fmha_cutlassF).
CATEGORIES = (
    ("communication", r"nccl|all_?reduce|all_?gather|reduce_?scatter"),
    ("attention", r"prefixlm::attention|_fwd_kernel|_bwd_dkdv|_bwd_dq|_bwd_delta|_cast_rows|"
                  r"flash|fmha|sdpa|cudnn|attention|flex|triton_tem_"),
    ("matmul", r"gemm|nvjet|xmma|cutlass|cublas|matmul|aten::mm|aten::addmm|aten::bmm"),
    ("optimizer", r"multi_tensor|adam|foreach|lerp"),
    ("elementwise/norm/loss (fused)", r"triton_(poi|red|per)_|elementwise|reduce|vectorized|"
                                      r"softmax|cross_entropy|nll|rms|norm"),
    ("copy/fill/index", r"copy|fill|memset|memcpy|index|gather|scatter|cat|arange"),
)
_COMPILED = tuple((name, re.compile(pattern, re.I)) for name, pattern in CATEGORIES)


def classify(name: str) -> str:
    """The category of a kernel (or CPU operator) name; "other" when no pattern matches."""
    for category, pattern in _COMPILED:
        if pattern.search(name):
            return category
    return "other"


def busy_and_span(intervals) -> tuple[float, float]:
    """(length of the union, last end - first start) of (start, end) intervals; (0, 0) if none."""
    if not intervals:
        return 0.0, 0.0
    ordered = sorted(intervals)
    busy, (start, end) = 0.0, ordered[0]
    for s, e in ordered[1:]:
        if s > end:  # a gap: close the current run of overlapping intervals
            busy += end - start
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    return busy, max(e for _, e in ordered) - ordered[0][0]


def idle_gaps(kernels, min_gap: float = 0.0) -> list[tuple[float, str, str]]:
    """(length, kernel before, kernel after) of every stretch longer than `min_gap` in which no
    kernel of `kernels` ((start, end, name) on any stream) runs; "before" is the kernel that ended
    last before the gap, "after" the first to start after it."""
    found = []
    ordered = sorted(kernels)
    if not ordered:
        return found
    end, last = ordered[0][1], ordered[0][2]
    for s, e, name in ordered[1:]:
        if s - end > min_gap:
            found.append((s - end, last, name))
        if e > end:
            end, last = e, name
    return found


# Host-side CUDA runtime calls that can stall the host until the GPU catches up (or are slow in
# themselves); any of them in a steady training step is worth a look.
_HOST_WAITS = re.compile(r"Synchronize|^cudaMalloc|^cudaFree|^cudaHostAlloc|^cudaMemcpy$|"
                         r"^cuMemAlloc|^cuMemFree")


def _short(name: str, width: int = 60) -> str:
    return name if len(name) <= width else name[:width - 3] + "..."


def _gap_table(kernels, n: int, top: int) -> list[tuple[str, str, int, float]]:
    """The `top` (before, after) kernel pairs with the most idle time between them: (before,
    after, gaps per step, ms per step), from gaps of over 5 us (shorter ones are launch latency)."""
    table: dict[tuple[str, str], list[float]] = {}
    for gap, before, after in idle_gaps(kernels, min_gap=5.0):
        entry = table.setdefault((_short(before), _short(after)), [0, 0.0])
        entry[0] += 1
        entry[1] += gap
    ranked = sorted(table.items(), key=lambda kv: -kv[1][1])[:top]
    return [(b, a, round(count / n, 1), round(us / 1e3 / n, 3)) for (b, a), (count, us) in ranked]


def is_kernel(event) -> bool:
    """A device-side profiler event that is work on the GPU (kernel, copy, memset), not a user
    annotation's range (e.g. "Optimizer.step#AdamW.step" spans the optimizer's kernels, and
    counting it too would count them twice: 4.7 ms per L step in the profiles up to 2026-11-28)."""
    return (event.device_type == DeviceType.CUDA
            and not getattr(event, "is_user_annotation", False))


def profile_steps(step, batches, device: torch.device, top: int = 12,
                  trace: str | None = None) -> dict:
    """Run `step(batch)` for each batch under the profiler; per-step ms by category and top names.
    `trace`: a path to write the Chrome trace to (gzipped when it ends in .gz)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for batch in batches:
            step(batch)
        if cuda:
            torch.cuda.synchronize(device)
    if trace:
        prof.export_chrome_trace(trace)
    per_name: dict[str, float] = {}
    for event in prof.key_averages():
        if cuda:
            if not is_kernel(event):
                continue
            us = event.self_device_time_total
        else:
            us = event.self_cpu_time_total
        if us > 0:
            per_name[event.key] = per_name.get(event.key, 0.0) + us
    n = max(len(batches), 1)
    by_category: dict[str, float] = {}
    for name, us in per_name.items():
        category = classify(name)
        by_category[category] = by_category.get(category, 0.0) + us / 1e3 / n
    total = sum(by_category.values())
    ranked = sorted(per_name.items(), key=lambda kv: -kv[1])[:top]
    record = dict(
        clock="device time of kernels" if cuda else "self CPU time of operators",
        steps=len(batches),
        ms_per_step=total,
        categories={k: round(v, 3) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        top=[(name[:120], round(us / 1e3 / n, 3)) for name, us in ranked],
    )
    if cuda:
        events = prof.events()
        kernels = [(e.time_range.start, e.time_range.end, e.name) for e in events
                   if is_kernel(e)]
        busy, span = (us / 1e3 / n for us in busy_and_span([k[:2] for k in kernels]))
        waits: dict[str, list[float]] = {}
        for e in events:
            if e.device_type == DeviceType.CPU and _HOST_WAITS.search(e.name):
                entry = waits.setdefault(e.name, [0, 0.0])
                entry[0] += 1
                entry[1] += e.time_range.end - e.time_range.start
        record.update(gaps=_gap_table(kernels, n, top), host_waits={
            name: (round(count / n, 1), round(us / 1e3 / n, 3))
            for name, (count, us) in sorted(waits.items(), key=lambda kv: -kv[1][1])})
        record.update(gpu_busy_ms=round(busy, 3), gpu_span_ms=round(span, 3),
                      gpu_idle_ms=round(span - busy, 3),
                      gpu_overlap_ms=round(sum(e - s for s, e, _ in kernels) / 1e3 / n - busy, 3))
    return record


def summary_line(profile: dict) -> str:
    """`attention 41% (12.3 ms), matmul 38% (...), ...` of one profile."""
    total = profile["ms_per_step"] or 1.0
    parts = [f"{name} {100 * ms / total:.0f}% ({ms:.1f} ms)"
             for name, ms in profile["categories"].items() if ms / total >= 0.01]
    line = f"{profile['clock']}, {total:.1f} ms/step: " + ", ".join(parts)
    if "gpu_busy_ms" in profile:
        line += (f"; GPU busy {profile['gpu_busy_ms']:.1f} of {profile['gpu_span_ms']:.1f} ms "
                 f"(idle {profile['gpu_idle_ms']:.1f}, kernels side by side "
                 f"{profile['gpu_overlap_ms']:.1f})")
    return line
