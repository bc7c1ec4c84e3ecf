"""`prefixlm train`, `generate`, `eval` and `export`."""

from __future__ import annotations

from pathlib import Path

__all__ = ["register"]


def _train(args) -> int:
    from ..train.config import load_config
    from ..train.run import run_training

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    run_training(cfg, resume=args.resume, resume_from=args.resume_from, overwrite=args.overwrite,
                 new_schedule=args.new_schedule)
    return 0


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return name


def _generate(args) -> int:
    import torch

    from ..model import answer
    from ..model.generate import check_sampling
    from ..train.checkpoint import load_trained

    check_sampling(args.max_new_tokens, args.temperature, args.top_p)  # before loading anything
    torch.manual_seed(args.seed)
    model, cfg, tokenizer, ckpt = load_trained(args.checkpoint, use_ema=not args.no_ema,
                                               device=_device(args.device),
                                               backend=args.attention_backend)
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
    from ..train.checkpoint import load_trained
    from ..train.distributed import setup
    from ..train.run import eval_batches_from, prepared_dataset, run_eval_source
    from ..train.trainer import evaluate

    if args.max_samples < 0:
        raise ValueError(f"--max-samples must be >= 0 (0: every sample), got {args.max_samples}")
    if args.capacity < 0:
        raise ValueError(f"--capacity must be >= 0 (0: the run's), got {args.capacity}")
    dist = setup(_device(args.device))
    model, cfg, tokenizer, ckpt = load_trained(args.checkpoint, use_ema=not args.no_ema,
                                               device=dist.device, backend=args.attention_backend)
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
        path = prepared_dataset(path, work_dir, cfg, dist, f"eval-{path.stem}")
    dataset = V1Dataset(str(path))
    if args.capacity:
        cfg.capacity = args.capacity
        cfg.validate()
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
    from ..hf.export import export_model
    from ..train.checkpoint import load_trained

    model, cfg, tokenizer, ckpt = load_trained(args.checkpoint, use_ema=not args.no_ema)
    out = export_model(model, tokenizer, args.out, overwrite=args.overwrite, source=str(ckpt))
    print(f"exported {ckpt} to {out} (model.safetensors, config.json, tokenizer.json, README.md)")
    return 0


def _loading_arguments(parser, device: bool = True) -> None:
    """The arguments of every command that loads a trained checkpoint."""
    from ..attention.registry import backend_names

    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="run directory or checkpoint directory")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights, not the EMA")
    if device:
        parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
        parser.add_argument("--attention-backend", default="auto", choices=backend_names(),
                            help="attention backend of the layers (a run-time choice: "
                                 "checkpoints do not record it)")


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
    p.add_argument("--new-schedule", action="store_true",
                   help="with --resume: continue on the learning-rate schedule of the new "
                        "settings (steps, warmup_steps, lr, min_lr_ratio) instead of refusing "
                        "to change it")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every key) as YAML and exit")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("generate", help="answer prompts with a trained checkpoint")
    _loading_arguments(p)
    p.add_argument("--prompt", action="append", metavar="TEXT", help="instruction (repeatable)")
    p.add_argument("--prompts-file", metavar="FILE", help="one instruction per line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute instead of a KV cache")
    p.set_defaults(func=_generate)

    p = subparsers.add_parser("eval", help="exact match of a checkpoint on held-out data")
    _loading_arguments(p)
    p.add_argument("--data", metavar="JSONL|DIR",
                   help="held-out JSONL or prepared dataset (default: the run's held-out split)")
    p.add_argument("--work-dir", metavar="DIR",
                   help="where a JSONL is prepared (default: the run's data/ folder)")
    p.add_argument("--capacity", type=int, default=0, help="tokens per batch (0: the run's)")
    p.add_argument("--max-samples", type=int, default=0,
                   help="evaluate the first N samples (0: all)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_eval)

    p = subparsers.add_parser("export", help="safetensors + config.json + tokenizer")
    _loading_arguments(p, device=False)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_export)
