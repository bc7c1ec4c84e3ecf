"""Checking a backend: random PrefixLM batches, the accuracy rule and the edge-case matrix of
`prefixlm verify`, shared by the tests and the command.

The rule (FlashAttention's tests): against an oracle one precision up (fp32 for fp16/bf16 inputs,
fp64 for fp32 and fp64 inputs), for the output and each gradient

    max|fast - oracle|  <= 2 * max|torch - oracle|  + 2 * max|(oracle + 0.3 - 0.3) - oracle|
                                                     (that last term rounded in fp32,
                                                      and at least ABS_SLACK_FLOOR;
                                                      fp32/fp64 kernels: at least 4 eps max|oracle|)
    mean|fast - oracle| <= 1.5 * mean|torch - oracle| + the same slack

where `torch` is the same math done by plain PyTorch in the inputs' dtype. Everything must be
finite, and rows past `info.total` (padding) exactly zero in the output and all three gradients.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from .api import prefixlm_attention
from .reference import reference_attention
from .seqinfo import SeqInfo

ABS_SLACK_FLOOR = 1e-6  # far below any masking error (~1e-1) and any fp16/bf16 rounding (~1e-3)
FULL_PRECISION_ULPS = 4  # fp32/fp64 kernels: extra slack in units of eps x max|oracle|
EDGE_LENGTHS = (0, 1, 2, 3, 63, 64, 65, 113, 127, 128, 129, 239, 1023, 1024, 1025)
BATCH_KINDS = ("edge_mix", "single", "many_tiny", "long_among_short", "all_zero_causal",
               "no_prefix", "random")


def pick_prefix(rng: np.random.Generator, length: int) -> int:
    """A prefix length from {0, 1, len-1, len, random}, clipped to [0, len]."""
    choice = int(rng.integers(5))
    prefix = (0, 1, length - 1, length, int(rng.integers(0, length + 1)))[choice]
    return min(max(prefix, 0), length)


def random_lengths(kind: str, rng: np.random.Generator, max_len: int = 1025):
    """(prefix_lens, causal_lens) of one batch of the given kind; lengths never exceed max_len."""
    edges = [n for n in EDGE_LENGTHS if n <= max_len]
    if kind == "edge_mix":       # every edge length once, prefixes from the edge choices
        lengths = list(rng.permutation(edges))
    elif kind == "single":
        lengths = [int(rng.choice([n for n in edges if n > 0]))]
    elif kind == "many_tiny":    # hundreds of samples of 0..4 tokens
        lengths = list(rng.integers(0, 5, size=int(rng.integers(150, 300))))
    elif kind == "long_among_short":
        lengths = list(rng.integers(1, 20, size=12))
        lengths.insert(int(rng.integers(len(lengths) + 1)), max_len)
    elif kind in ("all_zero_causal", "no_prefix", "random"):
        lengths = list(rng.integers(1, max_len + 1, size=int(rng.integers(1, 9))))
    else:
        raise ValueError(f"unknown batch kind {kind!r}; choose from {BATCH_KINDS}")
    lengths = [int(n) for n in lengths]
    if kind == "all_zero_causal":
        prefix = lengths
    elif kind == "no_prefix":
        prefix = [0] * len(lengths)
    else:
        prefix = [pick_prefix(rng, n) for n in lengths]
        if kind == "edge_mix":   # and a few samples with no causal tokens among the others
            for i in rng.choice(len(lengths), size=3, replace=False):
                prefix[i] = lengths[i]
    causal = [n - p for n, p in zip(lengths, prefix)]
    return prefix, causal


def random_seqinfos(capacity: int, seeds=(1, 2, 3), max_len: int = 19):
    """One random SeqInfo of the given capacity per seed (1..max_len tokens per sample, a few
    samples, any prefix split): batches of one shape class, e.g. to check that a compiled graph
    is reused across batches."""
    for seed in seeds:
        rng = np.random.default_rng(seed)
        lengths = rng.integers(1, max_len + 1, size=int(rng.integers(1, 6)))
        prefix = [int(rng.integers(0, n + 1)) for n in lengths]
        causal = [int(n - p) for n, p in zip(lengths, prefix)]
        yield SeqInfo.from_lengths(prefix, causal, capacity=capacity)


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    info: SeqInfo
    seed: int
    kind: str


LAYOUTS = ("separate", "gqkv", "unaligned")


def make_case(kind: str, seed: int, *, num_q_heads: int = 4, num_kv_heads: int = 2,
              head_dim: int = 64, dtype=torch.float32, device="cpu", max_len: int = 1025,
              padding: bool = True, layout: str = "separate", nan_padding: bool = False) -> Case:
    """A random packed batch of `kind` with standard-normal q, k, v and output gradient.

    Capacity exceeds the total by a random odd-ish tail when `padding` is set, so padding rows and
    totals that are not multiples of any block size are always exercised. `layout` "gqkv" gives
    q, k, v as the model passes them: views of its fused projection, one (T, (2 Hq + 2 Hkv) D)
    tensor in the order gate | q | k | v; "unaligned" as views of one (T, (Hq + 2 Hkv) D + Hq)
    tensor, whose rows are no multiple of 16 bytes (vector loads and tensor descriptors cannot take
    them; any strided view must still work). `nan_padding` fills the padding rows of q, k, v and the
    output gradient with NaN, which no real row may see.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    rng = np.random.default_rng(seed)
    prefix, causal = random_lengths(kind, rng, max_len)
    total = sum(prefix) + sum(causal)
    capacity = total + (int(rng.integers(1, 40)) if padding else 0)
    info = SeqInfo.from_lengths(prefix, causal, capacity=capacity, device=device)
    gen = torch.Generator().manual_seed(seed)

    def randn(heads):
        return torch.randn(capacity, heads, head_dim, generator=gen).to(device=device, dtype=dtype)

    if layout != "separate":
        widths = [num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        gate = num_q_heads * head_dim if layout == "gqkv" else num_q_heads
        fused = torch.randn(capacity, gate + sum(widths), generator=gen)
        fused = fused.to(device=device, dtype=dtype)
        _gate, q, k, v = fused.split([gate, *widths], dim=-1)
        q, k, v = (t.view(capacity, -1, head_dim) for t in (q, k, v))
    else:
        q, k, v = randn(num_q_heads), randn(num_kv_heads), randn(num_kv_heads)
    dout = randn(num_q_heads)
    if nan_padding:
        for t in (q, k, v, dout):
            t[total:] = float("nan")
    return Case(q, k, v, dout, info, seed, kind)


@dataclass
class ErrorStat:
    name: str
    max_err: float
    max_bound: float
    mean_err: float
    mean_bound: float
    finite: bool
    padding_zero: bool

    @property
    def ok(self) -> bool:
        return (self.finite and self.padding_zero and self.max_err <= self.max_bound
                and self.mean_err <= self.mean_bound)

    def __str__(self) -> str:
        return (f"{self.name}: max {self.max_err:.3g} (bound {self.max_bound:.3g}), mean "
                f"{self.mean_err:.3g} (bound {self.mean_bound:.3g}), finite={self.finite}, "
                f"padding_zero={self.padding_zero}")


def error_stat(name: str, fast: torch.Tensor, oracle: torch.Tensor, torch_same: torch.Tensor,
               total: int) -> ErrorStat:
    rows = slice(0, total)
    fast_d, oracle_d, torch_d = (t[rows].double() for t in (fast, oracle, torch_same))
    # The rounding slack is measured in fp32 at most: an fp32 kernel cannot beat fp32 rounding,
    # and for fp16/bf16 kernels the fp32 oracle's own rounding is the tiny slack FA's tests use.
    own = oracle[rows].to(torch.float32)
    slack = 2 * ((own + 0.3 - 0.3) - own).abs().max().item() if total else 0.0
    # Floor: where the exact answer is all zeros (e.g. dQ of a batch of 1-token samples, whose
    # softmax has no gradient) the formula above gives 0 and would demand bit-exact zeros from a
    # kernel that reaches them through a rounded dP - D.
    slack = max(slack, ABS_SLACK_FLOOR)
    if fast.dtype in (torch.float32, torch.float64) and total:
        # An fp32 kernel's error is rounding noise, and so is PyTorch's: "2x the other's" then
        # fails at random by a few percent. A few units in the last place of the largest value
        # settle that (a masking bug is ~1e5 times larger).
        scale = oracle_d.abs().max().item()
        slack = max(slack, FULL_PRECISION_ULPS * torch.finfo(fast.dtype).eps * scale)
    err = (fast_d - oracle_d).abs()
    torch_err = (torch_d - oracle_d).abs()
    return ErrorStat(
        name=name,
        max_err=err.max().item() if total else 0.0,
        max_bound=(2 * torch_err.max().item() if total else 0.0) + slack,
        mean_err=err.mean().item() if total else 0.0,
        mean_bound=(1.5 * torch_err.mean().item() if total else 0.0) + slack,
        finite=bool(torch.isfinite(fast).all()),
        padding_zero=bool((fast[total:] == 0).all()),
    )


def poison_allocator(device) -> None:
    """Fill freed CUDA memory with NaN so that an output row a kernel forgets to write is caught."""
    if torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        junk = torch.empty(min(free // 4, 1 << 30), dtype=torch.uint8, device=device)
        junk.fill_(0xFF)  # 0xFFFF... is NaN in fp16, bf16 and fp32
        del junk


def check_backend(backend: str, case: Case, *, grad: bool = True, softmax_scale=None,
                  deterministic: bool = False) -> list[ErrorStat]:
    """Run `backend` on `case` and measure output (and gradient) errors by the rule above."""
    q, k, v, info = case.q, case.k, case.v, case.info
    oracle_dtype = torch.float64 if q.dtype in (torch.float32, torch.float64) else torch.float32

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(grad) for t in (q, k, v)]
        out = fn(*leaves)
        if not grad:
            return [out.detach()]
        grads = torch.autograd.grad(out, leaves, case.dout.to(out.dtype), allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
        return [out.detach(), *grads]

    def reference_in(dtype):
        return lambda q_, k_, v_: reference_attention(q_, k_, v_, info, softmax_scale, dtype)

    oracle = run(reference_in(oracle_dtype), oracle_dtype)
    torch_same = run(reference_in(q.dtype), q.dtype)
    poison_allocator(q.device)
    fast = run(lambda q_, k_, v_: prefixlm_attention(
        q_, k_, v_, info, backend=backend, softmax_scale=softmax_scale,
        deterministic=deterministic), q.dtype)
    names = ("out", "dq", "dk", "dv")
    return [error_stat(n, f, o, t, info.total)
            for n, f, o, t in zip(names, fast, oracle, torch_same)]


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
HEADS = {"mha": (8, 8), "gqa3": (12, 4), "mqa": (8, 1)}


@dataclass
class MatrixEntry:
    """One batch of the matrix: where it sits, and its error statistics (or why it was skipped)."""

    kind: str
    heads: str
    head_dim: int
    layout: str
    tokens: int
    stats: list[ErrorStat]
    skipped: str | None = None


def verify_matrix(backend: str, *, device, dtype=torch.bfloat16, seed: int = 0,
                  max_len: int = 4096, heads=tuple(HEADS), head_dims=(64, 128), grad: bool = True,
                  deterministic: bool = False, layout: str = "alternate",
                  nan_padding: bool = False):
    """Every batch kind x head layout x head dim for `backend`, yielded one `MatrixEntry` at a
    time. `layout="alternate"` cycles through LAYOUTS, shifted by one per batch kind, so every
    (heads, head dim) pair meets each."""
    for i, (kind, head_name, head_dim) in enumerate(itertools.product(BATCH_KINDS, heads,
                                                                       head_dims)):
        num_q, num_kv = HEADS[head_name]
        turn = (i + BATCH_KINDS.index(kind)) % len(LAYOUTS)
        batch_layout = LAYOUTS[turn] if layout == "alternate" else layout
        case = make_case(kind, seed + i, num_q_heads=num_q, num_kv_heads=num_kv,
                         head_dim=head_dim, dtype=dtype, device=device, max_len=max_len,
                         layout=batch_layout, nan_padding=nan_padding)
        entry = MatrixEntry(kind, head_name, head_dim, batch_layout, case.info.total, [])
        try:
            entry.stats = check_backend(backend, case, grad=grad, deterministic=deterministic)
        except (NotImplementedError, ValueError) as exc:
            entry.skipped = str(exc)
        yield entry
