"""Generation speed on the CPU: one prompt at a time vs the batch engine, and the two layouts
behind the engine's choice (packed vs padded prefill, padded vs packed KV cache for decode).

The tiny preset (transformer and HRM), random weights (speed does not depend on them), byte
vocabulary; prompts of random lengths, greedy, a fixed budget of new tokens (no early stop), so
every mode generates the same tokens (checked). One thread unless --threads.

    python bench/generation.py [--prompts 64] [--new-tokens 64] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from prefixlm.attention import SeqInfo, decode_attention
from prefixlm.model import GenConfig, PrefixLM, generate_batch, preset_config


def _model(arch: str) -> PrefixLM:
    torch.manual_seed(0)
    return PrefixLM(preset_config("tiny", vocab_size=260, arch=arch), backend="sdpa").eval()


def _prompts(count: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high + 1, (count,), generator=g).tolist()
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def _timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def engine_rows(arch, prompts, new_tokens, slots_list, repeats):
    model = _model(arch)
    config = GenConfig(max_new_tokens=new_tokens)
    rows, reference = [], None
    for slots in slots_list:
        seconds, out = _timed(lambda: generate_batch(model, prompts, config, slots=slots),
                              repeats)
        ids = [r.ids for r in out]
        reference = reference or ids
        assert ids == reference, "batched tokens differ from one prompt at a time"
        tokens = sum(len(i) for i in ids)
        rows.append({"arch": arch, "mode": "one at a time" if slots == 1 else f"{slots} slots",
                     "slots": slots, "seconds": seconds, "new_tokens_per_s": tokens / seconds})
    base = rows[0]["seconds"]
    for row in rows:
        row["speedup"] = base / row["seconds"]
    return rows


def prefill_rows(arch, prompts, repeats):
    """One prefill forward of all prompts: packed varlen rows vs every prompt padded to the
    longest (the waste a padded (B, Lmax) prefill computes)."""
    model = _model(arch)
    lens = [len(p) for p in prompts]
    longest = max(lens)
    out = []
    with torch.no_grad():
        for layout, sample_lens in (("packed", lens), ("padded", [longest] * len(lens))):
            ids = torch.cat([torch.tensor(p + [0] * (n - len(p))) for p, n in
                             zip(prompts, sample_lens)])
            positions = torch.cat([torch.arange(n) for n in sample_lens])
            info = SeqInfo.from_lengths(sample_lens, [0] * len(lens))
            rows = torch.tensor(sample_lens).cumsum(0) - 1
            seconds, _ = _timed(lambda: model(ids, positions, info, rows=rows), repeats)
            out.append({"arch": arch, "layout": layout, "rows": int(sum(sample_lens)),
                        "seconds": seconds})
    return out


def decode_attention_rows(batch, lengths, heads, kv_heads, head_dim, repeats):
    """One decode step's attention for `batch` sequences: the engine's padded (B, L) cache with
    lengths (`decode_attention`) vs a packed cache (every sequence's keys concatenated, no pad)
    with a block mask, which is what a packed layout costs without a varlen kernel."""
    g = torch.Generator().manual_seed(0)
    longest, total = max(lengths), sum(lengths)
    q = torch.randn(batch, 1, heads, head_dim, generator=g)
    k = torch.randn(batch, longest, kv_heads, head_dim, generator=g)
    v = torch.randn(batch, longest, kv_heads, head_dim, generator=g)
    lens = torch.tensor(lengths)
    padded_s, padded = _timed(lambda: decode_attention(q, k, v, lengths=lens), repeats)
    packed_k = torch.cat([k[b, :n] for b, n in enumerate(lengths)])
    packed_v = torch.cat([v[b, :n] for b, n in enumerate(lengths)])
    owner = torch.repeat_interleave(torch.arange(batch), lens)
    mask = owner[None, :] == torch.arange(batch)[:, None]          # (B, total)

    def packed_step():
        # A packed cache also re-packs on every step (each sequence grows by one key).
        keys = torch.cat([packed_k[owner == b] for b in range(batch)])
        values = torch.cat([packed_v[owner == b] for b in range(batch)])
        out = F.scaled_dot_product_attention(
            q[:, 0].transpose(0, 1)[None], keys.transpose(0, 1)[None],
            values.transpose(0, 1)[None], attn_mask=mask[None, None],
            enable_gqa=heads != kv_heads)
        return out[0].transpose(0, 1)

    packed_s, packed = _timed(packed_step, repeats)
    torch.testing.assert_close(packed, padded[:, 0], rtol=1e-4, atol=1e-5)
    return [{"layout": "padded (B, L) + lengths", "keys": batch * longest, "seconds": padded_s},
            {"layout": "packed + block mask", "keys": batch * total, "seconds": packed_s}]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--slots", default="1,8,32,64")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prompts = _prompts(args.prompts, args.min_len, args.max_len)
    slots = [int(s) for s in args.slots.split(",")]
    engine, prefill = [], []
    for arch in ("transformer", "hrm"):
        engine += engine_rows(arch, prompts, args.new_tokens, slots, args.repeats)
        prefill += prefill_rows(arch, prompts, args.repeats)
    lengths = [len(p) + args.new_tokens // 2 for p in prompts[:32]]
    decode = decode_attention_rows(len(lengths), lengths, 4, 4, 32, max(args.repeats, 20))

    print(f"{args.prompts} prompts of {args.min_len}-{args.max_len} tokens, {args.new_tokens} new "
          f"tokens each, greedy; tiny preset, {args.threads} thread(s), torch {torch.__version__}")
    print(f"{'arch':<12}{'mode':<16}{'seconds':>9}{'new tok/s':>11}{'speedup':>9}")
    for r in engine:
        print(f"{r['arch']:<12}{r['mode']:<16}{r['seconds']:>9.2f}{r['new_tokens_per_s']:>11.0f}"
              f"{r['speedup']:>8.1f}x")
    print("prefill of all prompts in one forward:")
    for r in prefill:
        print(f"  {r['arch']:<12}{r['layout']:<8}{r['rows']:>7} rows {r['seconds'] * 1e3:>8.1f} ms")
    print(f"one decode step's attention, {len(lengths)} sequences of {min(lengths)}-"
          f"{max(lengths)} keys (4 heads x 32):")
    for r in decode:
        print(f"  {r['layout']:<26}{r['keys']:>7} key rows {r['seconds'] * 1e6:>9.0f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__,
                       "machine": platform.processor() or platform.machine(),
                       "engine": engine, "prefill": prefill, "decode_attention": decode}, f,
                      indent=1)


if __name__ == "__main__":
    main()
