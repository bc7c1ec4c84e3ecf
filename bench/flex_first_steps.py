"""Wall time of the first optimizer steps of compiled Flex training, and what compiled (GPU).

Trains the L model with `backend="flex"` (compiled blocks, 16384 tokens, the `prefixlm bench train`
batches) and prints each step's wall time and, after the first, `torch._dynamo`'s compile times.
The block mask of each batch is built before the step, outside the compiled blocks, by

  * `--mask intervals` (default): the Flex backend's own builder (per-row key intervals, tensor ops);
  * `--mask create_block_mask`: `create_block_mask(..., _compile=True)` over the same mask_mod
    (its compile time is what this script measures; BENCHMARKS.md, "Flex").

    python bench/flex_first_steps.py [--mask intervals|create_block_mask] [--steps 6] [--preset L]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's prefixlm

from prefixlm.attention.backends import flex  # noqa: E402
from prefixlm.bench.spec import SpecLoader  # noqa: E402
from prefixlm.bench.train import bench_config  # noqa: E402
from prefixlm.train.distributed import setup  # noqa: E402
from prefixlm.train.trainer import Trainer  # noqa: E402


def create_block_mask_builder(info, rows, device):
    """The same mask through FlexAttention's own compiled builder."""
    from torch.nn.attention.flex_attention import create_block_mask

    mine = intervals_builder(info, rows, device)
    return create_block_mask(mine.mask_mod, None, None, rows, rows, device=device,
                             BLOCK_SIZE=mine.BLOCK_SIZE, _compile=True)


intervals_builder = flex._block_mask


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mask", choices=("intervals", "create_block_mask"), default="intervals")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--preset", default="L")
    p.add_argument("--capacity", type=int, default=16384)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU (compiled Flex training)")
        return 1
    start = time.perf_counter()

    def say(*parts):
        print(f"[{time.perf_counter() - start:7.1f} s]", *parts, flush=True)

    cfg = bench_config(args.preset, args.capacity, 32768, True, "cuda", "transformer", "flex", [],
                  tempfile.mkdtemp(prefix="prefixlm-flex-first-steps-"))
    dist = setup("cuda")
    loader = SpecLoader(cfg.capacity, cfg.model.vocab_size, device=dist.device)
    batches = [loader.batch(i) for i in range(args.steps)]
    trainer = Trainer(cfg, dist, loader)
    if args.mask == "create_block_mask":
        flex._block_mask = create_block_mask_builder  # what flex.prepare builds with
    say(f"start: {args.preset} model, flex, block mask by {args.mask}")
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        # As the model does before its blocks; timed apart from the step, which finds it cached.
        flex.prepare(batch.info, cfg.capacity)
        torch.cuda.synchronize()
        mask_s = time.perf_counter() - t0
        stats = trainer.train_step([batch])
        torch.cuda.synchronize()
        say(f"step {i}: {time.perf_counter() - t0:.2f} s (mask {mask_s:.2f} s), "
            f"loss {stats['loss']:.3f}")
        if i == 0:
            from torch._dynamo.utils import compile_times
            print(compile_times(repr="str"), flush=True)
    say(f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
