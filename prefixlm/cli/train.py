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
    from ..model.generate import GenConfig, answers
    from ..train.checkpoint import load_trained

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    config = GenConfig(max_new_tokens=args.max_new_tokens, max_context=args.max_context,
                       temperature=args.temperature, top_p=args.top_p,
                       stop_strings=tuple(args.stop or ()), seed=args.seed).validate()
    model, cfg, tokenizer, ckpt = load_trained(args.checkpoint, use_ema=not args.no_ema,
                                               device=_device(args.device),
                                               backend=args.attention_backend)
    if tokenizer is None:
        raise ValueError(f"{ckpt} has no tokenizer.json: generate needs one to render prompts")
    prompts = list(args.prompt or [])
    if args.prompts_file:
        prompts += [line.rstrip("\n") for line in open(args.prompts_file) if line.strip()]
    if not prompts:
        raise ValueError("give --prompt TEXT (repeatable) or --prompts-file FILE")
    results = answers(model, tokenizer, prompts, args.condition, config, slots=args.batch_size,
                      use_cache=not args.no_cache, progress=len(prompts) > 1)
    for prompt, result in zip(prompts, results):
        print(result.text if len(prompts) == 1 else f"{prompt}\t{result.text}")
    return 0


def _eval(args) -> int:
    import json
    import tempfile

    if args.tasks:
        from ..train.checkpoint import load_trained
        from .evaluate import run_task_eval

        def load(device):
            return load_trained(args.checkpoint, use_ema=not args.no_ema, device=device,
                                backend=args.attention_backend)

        return run_task_eval(args, load, _device(args.device))

    from ..data.dataset import V1Dataset
    from ..model.hrm_text import is_hrm_text_dir
    from ..train.checkpoint import load_trained
    from ..train.distributed import setup
    from ..train.run import eval_batches_from, prepared_dataset, run_eval_source
    from ..train.trainer import evaluate

    if args.max_samples < 0:
        raise ValueError(f"--max-samples must be >= 0 (0: every sample), got {args.max_samples}")
    if args.capacity < 0:
        raise ValueError(f"--capacity must be >= 0 (0: the run's), got {args.capacity}")
    dist = setup(_device(args.device))
    hf_dir = is_hrm_text_dir(args.checkpoint)
    model, cfg, tokenizer, ckpt = load_trained(args.checkpoint, use_ema=not args.no_ema,
                                               device=dist.device, backend=args.attention_backend)
    data = args.data
    if data is None:
        data = None if hf_dir else run_eval_source(cfg, ckpt.parent.parent)
        if data is None:
            raise ValueError(f"no held-out data recorded for {ckpt}; pass --data FILE.jsonl|DIR")
    path = Path(data)
    scratch = None
    if path.is_file():
        if tokenizer is None:
            raise ValueError(f"{ckpt} has no tokenizer.json to prepare {path} with; pass a "
                             f"prepared dataset directory as --data")
        if args.work_dir:
            work_dir = Path(args.work_dir)
        elif hf_dir:  # nothing of a run to keep it in
            work_dir = Path(scratch := tempfile.mkdtemp(prefix="prefixlm-eval-"))
        else:
            work_dir = ckpt.parent.parent / "data"
        # The checkpoint's own tokenizer: the original tokenizer path may have moved since.
        path = prepared_dataset(path, work_dir, cfg, dist, f"eval-{path.stem}", tokenizer)
    dataset = V1Dataset(str(path))
    if args.capacity:
        cfg.capacity = args.capacity
        cfg.validate()
    result = evaluate(model, eval_batches_from(dataset, cfg, dist.device, args.max_samples)(), cfg,
                      dist.device)
    if scratch is not None:
        import shutil

        shutil.rmtree(scratch, ignore_errors=True)
        path = Path(data)
    result["checkpoint"] = str(ckpt)
    result["data"] = str(path)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"exact match: {100 * result['exact_match']:.1f}% of {result['samples']} samples "
              f"(token accuracy {100 * result['token_acc']:.1f}%, loss {result['loss']:.4f}) "
              f"[{ckpt}, {path}]")
    return 0


def _heldout_samples(cfg, ckpt: Path, tokenizer, count: int, hf_dir: bool):
    """Up to `count` (prefix ids, response ids) for `export --verify`, and where they come from:
    the run's held-out data, else synthetic task samples (random ids without a tokenizer)."""
    import torch

    from ..data.dataset import V1Dataset
    from ..data.rows import parse_row
    from ..data.synthetic import make_samples
    from ..train.run import run_eval_source

    source = None if hf_dir else run_eval_source(cfg, ckpt.parent.parent)
    if source is not None and Path(source).is_dir():
        dataset = V1Dataset(source)
        count = min(count, len(dataset.epoch(0).inst_len))
        return [tuple(map(list, dataset.sample(0, i))) for i in range(count)], source
    if tokenizer is None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, cfg.model.vocab_size, (count, 16), generator=g).tolist()
        return [(row[:8], row[8:]) for row in ids], "random token ids"
    rows = []
    if source is not None:
        with open(source, "rb") as f:
            for line in f:
                if len(rows) == count:
                    break
                try:
                    rows.append(parse_row(line, tokenizer.conditions)[:3])
                except ValueError:
                    continue
    else:
        source = "synthetic task samples"
        rows = [(s["instruction"], s["response"], None) for s in make_samples(count, seed=1)]
    return [(tokenizer.encode_prefix(instruction, condition), tokenizer.encode_response(response))
            for instruction, response, condition in rows], source


def _export(args) -> int:
    from ..hf import save_pretrained, verify_export
    from ..model import hrm_text
    from ..train.checkpoint import load_trained

    hf_dir = hrm_text.is_hrm_text_dir(args.checkpoint)
    model, cfg, tokenizer, ckpt = load_trained(args.checkpoint, use_ema=not args.no_ema)
    # HRM-Text's context: the dataset's max_seq_len - 1 (context_size counts one more token).
    context = (hrm_text.read_config(ckpt).get("max_position_embeddings", 4096) if hf_dir
               else cfg.context_size - 1)
    out = save_pretrained(model, args.out, tokenizer, dtype=args.dtype,
                             max_position_embeddings=context, overwrite=args.overwrite)
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"exported {ckpt} to {out} (hrm_text: {files})")
    if args.verify:
        samples, where = _heldout_samples(cfg, ckpt, tokenizer, args.verify_samples, hf_dir)
        result = verify_export(out, samples, source=model)
        print(f"verify: transformers vs prefixlm on {result['samples']} samples ({where}): max "
              f"|logit difference| {result['max_abs_diff']:.3g} (logits up to "
              f"{result['logit_scale']:.3g}); exported vs checkpoint weights "
              f"({args.dtype}): {result['source_max_abs_diff']:.3g}")
        if result["max_abs_diff"] > 1e-4 * max(1.0, result["logit_scale"]):
            raise ValueError(f"verify failed: transformers' logits of {out} differ from "
                             f"prefixlm's by {result['max_abs_diff']:.3g}")
    return 0


def _loading_arguments(parser, device: bool = True) -> None:
    """The arguments of every command that loads a trained checkpoint."""
    from ..attention.registry import backend_names

    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="run directory, checkpoint directory or hrm_text (Hugging Face) "
                             "directory")
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
                   help="with --resume: continue on the schedule of the new settings (steps, "
                        "warmup_steps, lr, min_lr_ratio, model.bp_*) instead of refusing to "
                        "change it")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (every key) as YAML and exit")
    p.set_defaults(func=_train)

    p = subparsers.add_parser("generate", help="answer prompts with a trained checkpoint")
    _loading_arguments(p)
    p.add_argument("--prompt", action="append", metavar="TEXT", help="instruction (repeatable)")
    p.add_argument("--prompts-file", metavar="FILE", help="one instruction per line")
    p.add_argument("--condition", metavar="NAME[,NAME]",
                   help="condition tokens before the instruction (comma-separated, in order)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--max-context", type=int, metavar="N",
                   help="HRM-Text's cap: at most N - prompt tokens are generated; a prompt of N "
                        "tokens or more gets no answer")
    p.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop string (repeatable; cut from the answer); end-of-answer always stops")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (one stream per prompt)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N",
                   help="prompts decoded together")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute every token, one prompt at a time (the reference)")
    p.set_defaults(func=_generate)

    p = subparsers.add_parser(
        "eval", help="score a checkpoint: teacher-forced on held-out data, or --tasks",
        description="Teacher-forced exact match on held-out data (--data, default the run's "
                    "held-out split), or generated answers scored on benchmark tasks (--tasks) "
                    "as HRM-Text scores them.")
    _loading_arguments(p)
    p.add_argument("--data", metavar="JSONL|DIR",
                   help="held-out JSONL or prepared dataset (default: the run's held-out split)")
    p.add_argument("--work-dir", metavar="DIR",
                   help="where a JSONL is prepared (default: the run's data/ folder)")
    p.add_argument("--capacity", type=int, default=0, help="tokens per batch (0: the run's)")
    p.add_argument("--max-samples", type=int, default=0,
                   help="evaluate the first N samples (0: all)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    from .evaluate import add_task_arguments

    add_task_arguments(p)
    p.set_defaults(func=_eval)

    p = subparsers.add_parser(
        "export", help="write a checkpoint as a Hugging Face hrm_text directory",
        description="Write the model as transformers' hrm_text (config.json, model.safetensors, "
                    "generation_config.json) with its tokenizer (tokenizer.json, "
                    "tokenizer_config.json, tokenizer_info.json): AutoModelForCausalLM, "
                    "AutoTokenizer and vLLM load it. Needs the [hf] extra.")
    _loading_arguments(p, device=False)
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype of the saved weights (default: float32, as trained)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--verify", action="store_true",
                   help="reload the export in transformers and compare its logits with "
                        "prefixlm's on held-out samples")
    p.add_argument("--verify-samples", type=int, default=8, metavar="N")
    p.set_defaults(func=_export)
