"""What the COMMIT checksums cost: a checkpoint save with and without them, the verification on
resume, and the throughput of candidate hashes over one of its files (CPU, single process).

The checkpoint holds a model of `--params` parameters (fp32 weights, AdamW's two moments and the
EMA: 16 bytes per parameter, 100 MB for the default 6.25 M). A save is timed whole (DCP with its
fsyncs, rank file, checksums, COMMIT, rename) and, inside it, the time spent in `file_crc32`,
which is the checksums' cost (a save without them differs by that alone; timing two variants of
the whole save on a shared machine measures mostly the disk's noise). Medians of `--repeats`
runs. Prints a table, writes JSON.

    python bench/checkpoint_checksum.py [--params 6250000] [--repeats 5] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's prefixlm

from prefixlm.train import checkpoint as ckpt  # noqa: E402


class Flat(torch.nn.Module):
    """`params` parameters in a few matrices, shaped like a model's."""

    def __init__(self, params: int, width: int = 1024):
        super().__init__()
        rows = max(1, params // width // 4)
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(rows, width)) for _ in range(4))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _stream(path: Path, update) -> None:
    block = bytearray(4 << 20)
    view = memoryview(block)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(block):
            update(view[:n])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=int, default=6_250_000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default="bench/results/checkpoint_checksum_cpu.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = Flat(args.params)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()
    ema = {name: p.detach().clone() for name, p in model.named_parameters()}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        counter = iter(range(10**6))

        def save():
            return ckpt.save_checkpoint(root, next(counter), model, optimizer, ema, {}, 0,
                                        keep=1)

        path = save()
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        real, spent = ckpt.file_crc32, [0.0]

        def timed_crc(p):
            start = time.perf_counter()
            try:
                return real(p)
            finally:
                spent[0] += time.perf_counter() - start

        saves, crcs = [], []
        ckpt.file_crc32 = timed_crc
        try:
            for _ in range(args.repeats):
                spent[0] = 0.0
                saves.append(_timed(save))
                crcs.append(spent[0])
        finally:
            ckpt.file_crc32 = real
        with_crc, crc_time = statistics.median(saves), statistics.median(crcs)
        path = save()
        verify = statistics.median(_timed(lambda: ckpt.verify(path)) for _ in range(args.repeats))
        shard = max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)
        hashes = {}
        for name in ("crc32", "blake2b", "sha256", "sha1", "md5"):
            if name == "crc32":
                def run():
                    state = [0]
                    _stream(shard, lambda b: state.__setitem__(0, zlib.crc32(b, state[0])))
            else:
                def run(name=name):
                    _stream(shard, hashlib.new(name).update)
            best = min(_timed(run) for _ in range(args.repeats))
            hashes[name] = shard.stat().st_size / best / 1e6

    result = {
        "what": "checkpoint save with and without per-file CRC-32 in COMMIT; resume-time verify",
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        "threads": torch.get_num_threads(),
        "checkpoint_mb": size / 1e6, "save_s": with_crc, "crc_s_in_save": crc_time,
        "crc_pct_of_save": 100 * crc_time / with_crc,
        "verify_s": verify, "hash_mb_per_s": hashes, "repeats": args.repeats,
    }
    print(f"checkpoint {size / 1e6:.1f} MB (page cache, single process)")
    print(f"{'save (median)':<28}{with_crc * 1e3:8.1f} ms")
    print(f"{'  of which CRC-32':<28}{crc_time * 1e3:8.1f} ms ({result['crc_pct_of_save']:.1f} %)")
    print(f"{'verify on resume':<28}{verify * 1e3:8.1f} ms")
    for name, rate in hashes.items():
        print(f"{'  ' + name + ' MB/s':<28}{rate:8.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
