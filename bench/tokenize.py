"""Tokenization throughput of a mixture source against raw `tokenizers` on the same machine.

Writes a synthetic instruction/response JSONL (the Python standard library's sources, as
bench/prepare_throughput.py does), trains a byte-level BPE on it, then times, on the same texts:

  tokenizers encode_batch        every instruction and response, already in memory, in one
                                 `Tokenizer.encode_batch` call (its own threads, all cores)
  tokenizers encode_batch_fast   the same without offsets (tokenizers >= 0.20)
  prefixlm, W workers            `prefixlm prepare --mixture`'s tokenization stage: read the file
                                 in chunks, parse every row, render and tokenize it, write the
                                 source's cache entry (encode.encode_sources, fresh cache each run)
  prefixlm prepare (end to end)  the whole `prepare_mixture` with a fresh cache, for information

Throughput is text tokens per second (instruction + response tokens; prefixlm adds its markers
on top); each figure is the best of --repeat runs. Prints a table and writes
bench/results/tokenize_<--name>.json. Needs `pip install 'prefixlm[hf]'`.

    python bench/tokenize.py [--mb 50] [--vocab 16000] [--workers N ...] [--repeat 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file's name is the standard library's `tokenize` (which linecache, inspect and torch
# import): take its folder off the path before anything imports it.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

_spec = importlib.util.spec_from_file_location("prepare_throughput",
                                               _HERE / "prepare_throughput.py")
_throughput = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_throughput)
train_tokenizer, write_jsonl = _throughput.train_tokenizer, _throughput.write_jsonl


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def baseline(raw, data: Path, repeat: int) -> tuple[int, dict]:
    """(text tokens, {name: seconds}) of raw `tokenizers` on every text of `data`, in memory."""
    texts = []
    with open(data) as f:
        for line in f:
            row = json.loads(line)
            texts += [row["instruction"], row["response"]]
    tokens = sum(len(e.ids) for e in raw.encode_batch(texts, add_special_tokens=False))
    timings = {"tokenizers encode_batch": best(
        lambda: raw.encode_batch(texts, add_special_tokens=False), repeat)}
    if hasattr(raw, "encode_batch_fast"):
        timings["tokenizers encode_batch_fast"] = best(
            lambda: raw.encode_batch_fast(texts, add_special_tokens=False), repeat)
    return tokens, timings


def machine() -> dict:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": model or platform.processor(), "usable_cores": cores,
            "python": platform.python_version(), "platform": platform.platform()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0, help="JSONL size in MB (1e6 bytes)")
    parser.add_argument("--vocab", type=int, default=16000)
    parser.add_argument("--workers", type=int, nargs="+",
                        help="worker counts to time (default: 1 and the usable cores)")
    parser.add_argument("--chunk-mb", type=float, default=8.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--name", default="mixture_source_vs_tokenizers_cpu")
    args = parser.parse_args()

    import tokenizers

    from prefixlm.data.cache import SourceCache, cache_key
    from prefixlm.data.encode import ReadOptions, encode_sources
    from prefixlm.data.mixture import prepare_mixture
    from prefixlm.data.sources import Source
    from prefixlm.data.tokenizer import load_tokenizer
    from prefixlm.fsutil import file_sha256

    info = machine()
    workers = args.workers or sorted({1, info["usable_cores"]})
    results = {"machine": info, "tokenizers": tokenizers.__version__, "mb": args.mb,
               "vocab": args.vocab, "chunk_mb": args.chunk_mb, "repeat": args.repeat,
               "command": "python " + " ".join(sys.argv), "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data.jsonl"
        nrows = write_jsonl(data, int(args.mb * 1e6))
        size = data.stat().st_size
        train_tokenizer(tmp / "tokenizer.json", data, args.vocab)
        print(f"{size / 1e6:.1f} MB, {nrows} rows; BPE vocab {args.vocab}; {info['cpu']}, "
              f"{info['usable_cores']} usable cores", flush=True)
        raw = tokenizers.Tokenizer.from_file(str(tmp / "tokenizer.json"))
        tokens, timings = baseline(raw, data, args.repeat)

        tok = load_tokenizer(str(tmp / "tokenizer.json"))
        runs = iter(range(1 << 30))

        def ours(n: int):
            cache = SourceCache(tmp / f"cache-{next(runs)}")
            source = Source("data.jsonl", data, "jsonl", "bench",
                            options={"read": ReadOptions()})
            key = cache_key(file_sha256(data), {"bench": True})
            out = encode_sources([(source, key, {})], tok, None, cache, n, args.chunk_mb,
                                 progress=False)
            assert out["data.jsonl"].meta["samples"] == nrows

        for n in workers:
            timings[f"prefixlm, {n} worker{'s' if n > 1 else ''}"] = best(lambda: ours(n),
                                                                          args.repeat)
        mix = tmp / "mix.yaml"
        mix.write_text(f"tokenizer: {tmp / 'tokenizer.json'}\nsources:\n  - path: data.jsonl\n")
        runs_e2e = iter(range(1 << 30))
        timings["prefixlm prepare (end to end)"] = best(lambda: prepare_mixture(
            mix, tmp / f"out-{next(runs_e2e)}", cache_dir=tmp / f"e2e-{next(runs_e2e)}",
            progress=False), args.repeat)

    base = timings["tokenizers encode_batch"]
    print(f"\n{'':32s} {'seconds':>8s} {'M tokens/s':>11s} {'MB/s':>7s} {'vs encode_batch':>16s}")
    for name, seconds in timings.items():
        row = {"name": name, "seconds": round(seconds, 3),
               "tokens_per_s": round(tokens / seconds), "mb_per_s": round(size / seconds / 1e6, 2),
               "vs_encode_batch": round(base / seconds, 3)}
        results["rows"].append(row)
        print(f"{name:32s} {seconds:8.2f} {tokens / seconds / 1e6:11.2f} "
              f"{size / seconds / 1e6:7.1f} {base / seconds:15.2f}x")
    results["text_tokens"] = tokens
    out = _HERE / "results" / f"tokenize_{args.name}.json"
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
