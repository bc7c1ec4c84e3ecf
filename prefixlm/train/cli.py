"""`prefixlm train`, `generate`, `eval` and `export`."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

__all__ = ["register"]


def _train(args) -> int:
    import torch

    from ..cli import CLIError
    from .checkpoint import complete_checkpoints
    from .config import load_config
    from .data import build_data, eval_batches_from
    from .distributed import setup, teardown
    from .trainer import NonFiniteLossError, Trainer

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    dist = setup(cfg.device)
    if cfg.max_threads:
        torch.set_num_threads(cfg.max_threads)
    elif dist.device.type == "cpu" and cfg.model.hidden <= 256:
        torch.set_num_threads(1)
    try:
        ckpt_root = Path(cfg.run_dir) / "checkpoints"
        existing = complete_checkpoints(ckpt_root)
        if args.overwrite and dist.is_main:
            shutil.rmtree(ckpt_root, ignore_errors=True)
            (Path(cfg.run_dir) / "metrics.jsonl").unlink(missing_ok=True)
            existing = []
        if existing and not (args.resume or args.resume_from) and not args.overwrite:
            raise CLIError(f"{cfg.run_dir} already holds checkpoints (newest {existing[-1].name}); "
                           f"pass --resume to continue it, --overwrite to start over, or "
                           f"run_dir=OTHER")
        started = time.perf_counter()
        data = build_data(cfg, dist)
        vocab = data.tokenizer.vocab_size
        if cfg.model.vocab_size == 0:
            cfg.model.vocab_size = vocab
        elif cfg.model.vocab_size < vocab:
            raise CLIError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                           f"tokenizer's {vocab}")
        eval_batches = None
        if data.eval_dataset is not None:
            eval_batches = eval_batches_from(data.eval_dataset, cfg, dist.device,
                                             cfg.eval_max_samples)
        trainer = Trainer(cfg, dist, data.train_loader, eval_batches=eval_batches,
                          tokenizer=data.tokenizer)
        say = print if dist.is_main else (lambda *a, **k: None)
        say(f"prefixlm train: {cfg.model.preset} model ({cfg.model.arch}, "
            f"{trainer.model.num_params() / 1e6:.2f}M params) on {dist.device} x{dist.world_size}, "
            f"{cfg.steps} steps of {cfg.capacity * cfg.grad_accum * dist.world_size} tokens; "
            f"data {data.train_path}; logs {Path(cfg.run_dir) / 'metrics.jsonl'}", flush=True)
        if args.resume or args.resume_from:
            if complete_checkpoints(ckpt_root) or args.resume_from:
                path = trainer.resume(args.resume_from)
                say(f"resumed from {path} (step {trainer.step})", flush=True)
            else:
                say(f"no checkpoint in {ckpt_root} yet: starting from step 0", flush=True)
        try:
            trainer.fit()
        except NonFiniteLossError as exc:
            raise CLIError(str(exc)) from None
        if trainer.last_checkpoint is None or trainer.step != int(
                trainer.last_checkpoint.name.split("_")[1]):
            trainer.save()
        result = trainer.evaluate()
        trainer.close()
        elapsed = time.perf_counter() - started
        if result is not None:
            weights = "EMA weights" if trainer.ema is not None and cfg.use_ema else "weights"
            say(f"held-out exact match: {100 * result['exact_match']:.1f}% of "
                f"{result['samples']} samples (token accuracy {100 * result['token_acc']:.1f}%, "
                f"loss {result['loss']:.3f}, {weights})")
        say(f"checkpoint: {trainer.last_checkpoint}")
        say(f"done in {elapsed:.0f}s. Try: prefixlm generate --checkpoint {cfg.run_dir} "
            f"--prompt \"reverse hello\"")
        return 0
    finally:
        teardown()


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return name


def _generate(args) -> int:
    import torch

    from .inference import answer, load_trained

    torch.manual_seed(args.seed)
    device = _device(args.device)
    model, cfg, tokenizer, ckpt = load_trained(args.checkpoint, use_ema=not args.no_ema,
                                               device=device)
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.rstrip("\n") for line in open(args.prompts_file) if line.strip()]
    if not prompts:
        raise ValueError("give --prompt TEXT (repeatable) or --prompts-file FILE")
    for prompt in prompts:
        text = answer(model, tokenizer, prompt, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      use_cache=not args.no_cache)
        print(text if len(prompts) == 1 else f"{prompt}\t{text}")
    return 0


def _eval(args) -> int:
    import json

    from ..data.dataset import V1Dataset
    from .data import _prepared, eval_batches_from, run_eval_source
    from .distributed import setup
    from .inference import load_trained
    from .trainer import evaluate

    dist = setup(_device(args.device))
    model, cfg, tokenizer, ckpt = load_trained(args.checkpoint, use_ema=not args.no_ema,
                                               device=dist.device)
    data = args.data
    if data is None:
        data = run_eval_source(cfg, ckpt.parent.parent)
        if data is None:
            raise ValueError(f"no held-out data recorded for {ckpt}; pass --data FILE.jsonl|DIR")
    path = Path(data)
    if path.is_file():
        if args.data is not None or not cfg.tokenizer == "byte":
            # The checkpoint's own copy: the original tokenizer path may have moved since.
            cfg.tokenizer = str(ckpt / "tokenizer")
        work_dir = Path(args.work_dir) if args.work_dir else ckpt.parent.parent / "data"
        path = _prepared(path, work_dir, cfg, dist, f"eval-{path.stem}")
    dataset = V1Dataset(str(path))
    if args.capacity:
        cfg.capacity = args.capacity
    result = evaluate(model, eval_batches_from(dataset, cfg, dist.device, args.max_samples)(), cfg,
                      dist.device)
    result["checkpoint"] = str(ckpt)
    result["data"] = str(path)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"exact match: {100 * result['exact_match']:.1f}% of {result['samples']} samples "
              f"(token accuracy {100 * result['token_acc']:.1f}%, loss {result['loss']:.4f}) "
              f"[{ckpt}, {path}]")
    return 0


def _export(args) -> int:
    from .export import export_model
    from .inference import load_trained

    model, cfg, tokenizer, ckpt = load_trained(args.checkpoint, use_ema=not args.no_ema)
    out = export_model(model, tokenizer, args.out, overwrite=args.overwrite, source=str(ckpt))
    print(f"exported {ckpt} to {out} (model.safetensors, config.json, tokenizer.json, README.md)")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a PrefixLM model (no arguments: the built-in CPU quick start)",
        description="Train on packed PrefixLM batches. Settings come from defaults, then --config "
                    "YAML, then KEY=VALUE overrides (e.g. steps=500 model.hidden=256 "
                    "data=train.jsonl). Under torchrun the model is sharded with FSDP2.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--config", metavar="YAML", help="run configuration file")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint of run_dir")
    p.add_argument("--resume-from", metavar="DIR",
                   help="continue from this checkpoint directory (run_dir/checkpoints/step_N)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete run_dir's checkpoints and logs and start over")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every key) as YAML and exit")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("generate", help="answer prompts with a trained checkpoint")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="run directory or checkpoint directory")
    p.add_argument("--prompt", action="append", metavar="TEXT", help="instruction (repeatable)")
    p.add_argument("--prompts-file", metavar="FILE", help="one instruction per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    p.add_argument("--no-cache", action="store_true", help="recompute instead of a KV cache")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.set_defaults(func=_generate)

    p = subparsers.add_parser("eval", help="exact match of a checkpoint on held-out data")
    p.add_argument("--checkpoint", required=True, metavar="DIR")
    p.add_argument("--data", metavar="JSONL|DIR",
                   help="held-out JSONL or prepared dataset (default: the run's held-out split)")
    p.add_argument("--work-dir", metavar="DIR",
                   help="where a JSONL is prepared (default: the run's data/ folder)")
    p.add_argument("--capacity", type=int, default=0)
    p.add_argument("--max-samples", type=int, default=0)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    p.set_defaults(func=_eval)

    p = subparsers.add_parser("export", help="safetensors + config.json + tokenizer")
    p.add_argument("--checkpoint", required=True, metavar="DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_export)
