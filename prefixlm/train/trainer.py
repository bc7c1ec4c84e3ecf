"""The training loop: micro-batches -> globally normalised loss -> clip -> AdamW -> EMA -> logs.

Loss normalisation: every micro-batch contributes its *summed* cross-entropy divided by the number
of supervised tokens of the whole step (all micro-batches, all ranks), so a step's gradient is the
gradient of the mean token loss of the global batch whatever its split into ranks and micro-batches
(FSDP2 averages gradients over ranks, hence the extra factor world_size).
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from pathlib import Path

import torch

from ..data.loader import IGNORE_INDEX
from ..fsutil import write_json
from ..model import PrefixLM, hrm_text
from ..model.config import bp_steps_at
from ..model.flops import step_flops, useful_pairs
from . import checkpoint as ckpt
from .config import TrainConfig, save_config
from .init_from import load_initial_weights
from .distributed import Dist, all_reduce, reshard_all, shard_model
from .metrics import MetricsLog, batch_stats, peak_flops

__all__ = ["Trainer", "NonFiniteLossError", "NonFiniteWeightError", "lr_at", "SCHEDULE_KEYS",
           "evaluate", "autocast_for", "release_memory"]

_STAT_KEYS = ("ce_sum", "tokens", "correct", "samples", "exact")


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the optimizer step was not taken."""


class NonFiniteWeightError(RuntimeError):
    """A weight became NaN/inf (e.g. a learning rate far too high); no checkpoint was written."""


# The settings `lr_at` and the bp warm-up (`bp_steps_at`) read: changing one on resume changes the
# learning rate or the differentiated stack calls of the steps left.
SCHEDULE_KEYS = ("steps", "warmup_steps", "lr", "min_lr_ratio", "model.bp_min_steps",
                 "model.bp_max_steps", "model.bp_warmup_ratio")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine from lr down to lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def release_memory(device: torch.device) -> None:
    """Between runs in one process (benchmarks): drop unreachable objects, then give the CUDA
    caching allocator's free blocks back, so the next run starts from the same memory."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the run computes under bf16 autocast (auto: on CUDA)."""
    return cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")


def autocast_for(cfg: TrainConfig, device: torch.device):
    if not uses_bf16(cfg, device):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _head_rows(batch):
    """The rows that need logits: the batch's supervised rows when its loader lists them."""
    return getattr(batch, "supervised_rows", None)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 parameter (a DTensor), sharing its storage; else `t`."""
    return t.to_local() if hasattr(t, "to_local") else t


class EMA:
    """Exponential moving average of the parameters in fp32 (local shards under FSDP2).

    The decay ramps up as min(decay, (1 + step) / (10 + step)) so short runs are not dominated by
    the random initialisation."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [name for name, _ in model.named_parameters()]
        self.shadow = {name: p.detach().float().clone() for name, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model, step: int):
        decay = min(self.decay, (1 + step) / (10 + step))
        # On the local shards: a foreach op over DTensors goes through DTensor's Python dispatch,
        # milliseconds of host time per step while the GPU idles.
        params = [_local(p.detach()).float() for p in model.parameters()]
        torch._foreach_lerp_([_local(self.shadow[n]) for n in self.names], params, 1 - decay)

    @contextlib.contextmanager
    def swapped_in(self, model):
        """Run the block with the EMA weights in the model, restoring the trained ones after."""
        backup = {name: p.detach().clone() for name, p in model.named_parameters()}
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in model.named_parameters():
                    p.copy_(backup[name])


def build_optimizer(model, cfg: TrainConfig, device: torch.device):
    # Every parameter decays, as in HRM-Text (one AdamATan2 group over model.parameters(): the
    # embedding and the LM head too). Its norms have no weights and z_L_init is a buffer, so
    # nothing is left that should not. A parameter without a gradient in a step (the embedding
    # while the bp warm-up differentiates no call that reads it) is skipped, decay included.
    groups = [{"params": list(model.parameters()), "weight_decay": cfg.weight_decay}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, ValueError, TypeError):  # fused not supported for this device/dtype
        return torch.optim.AdamW(groups, foreach=True, **kwargs)


@torch.no_grad()
def evaluate(model, batches, cfg: TrainConfig, device: torch.device) -> dict:
    """Teacher-forced metrics over `batches`. Exact match here equals greedy generation's: greedy
    decoding reproduces a response iff every teacher-forced argmax along it is right."""
    model.eval()
    totals = torch.zeros(len(_STAT_KEYS), device=device, dtype=torch.float64)
    for batch in batches:
        head_rows = _head_rows(batch)
        with autocast_for(cfg, device):
            logits = model(batch.inputs, batch.position_ids, batch.info, rows=head_rows)
        stats = batch_stats(logits, batch.labels, batch.info, head_rows)
        totals += torch.stack([stats[k].double() for k in _STAT_KEYS])
    model.train()
    # FSDP2 keeps the root (and our blocks: reshard_after_forward=False) unsharded after a forward
    # until its backward; without a backward the full parameters would stay registered (and the
    # EMA swap would mix plain tensors with sharded ones).
    reshard_all(model)
    values = dict(zip(_STAT_KEYS, totals.tolist()))
    tokens, samples = max(values["tokens"], 1), max(values["samples"], 1)
    return {"loss": values["ce_sum"] / tokens, "token_acc": values["correct"] / tokens,
            "exact_match": values["exact"] / samples, "samples": int(values["samples"])}


class Trainer:
    """Owns model, optimizer, EMA and the loop. `loader` yields Batch objects and has
    state_dict()/load_state_dict(); `eval_batches` is a callable returning held-out batches.
    `initialize`: load `cfg.init_from`'s weights (False when a resume will replace them)."""

    def __init__(self, cfg: TrainConfig, dist: Dist, loader, *, eval_batches=None,
                 tokenizer=None, initialize: bool = True):
        self.cfg, self.dist, self.loader = cfg, dist, loader
        self.tokenizer = tokenizer
        self.eval_batches = eval_batches
        self.device = dist.device
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        # Same seed on every rank: FSDP2 shards one identical initialisation.
        torch.manual_seed(cfg.seed)
        model = PrefixLM(cfg.model, backend=cfg.attention_backend)
        if cfg.init_from and initialize:
            load_initial_weights(model, cfg.init_from, use_ema=cfg.use_ema)
        model = model.to(self.device)
        model.activation_checkpointing = cfg.activation_checkpointing  # before compile and FSDP2
        if cfg.compile:
            for block in model.all_blocks():
                block.compile(dynamic=False)
        if dist.distributed:
            bf16 = self.device.type == "cuda" and uses_bf16(cfg, self.device)
            shard_model(model, dist, bf16_blocks=bf16, blocks_per_unit=cfg.fsdp_blocks_per_unit)
        self.model = model
        self.optimizer = build_optimizer(model, cfg, self.device)
        self.ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.step = 0
        self.history: list[dict] = []
        self.last_checkpoint: Path | None = None
        # Set to a signals.GracefulStop to stop (after a checkpoint) when a rank asks; `stopped`
        # then holds the step at which the ranks agreed to.
        self.stop = None
        self.stopped: int | None = None
        self.peak = peak_flops(self.device, cfg.peak_tflops)
        self._setup_evaluation(tokenizer)
        sinks = []
        if cfg.wandb and dist.is_main:
            from .wandb_log import WandbLog
            sinks.append(WandbLog(cfg, self.run_dir,
                                  {"num_params": model.num_params(non_embedding=False)}))
        self.log = MetricsLog(self.run_dir, dist.is_main, cfg.tensorboard, sinks)
        torch.manual_seed(cfg.seed + 1 + dist.rank)  # per-rank stream for anything sampled later

    # -- checkpoints -------------------------------------------------------------------------
    def check_weights(self):
        """Raise NonFiniteWeightError naming the first parameter (or EMA tensor) that holds a NaN
        or inf, on every rank (one all-reduce over per-tensor flags of the local shards)."""
        tensors = list(self.model.named_parameters())
        if self.ema is not None:
            tensors += [(f"ema.{name}", t) for name, t in self.ema.shadow.items()]
        bad = torch.stack([~torch.isfinite(_local(t.detach())).all() for _, t in tensors]).float()
        bad = all_reduce(bad, "max").cpu()
        if bad.any():
            name = tensors[int(bad.nonzero()[0])][0]
            raise NonFiniteWeightError(
                f"{name} holds NaN/inf after step {self.step}; stopped before saving "
                f"checkpoint step_{self.step:08d} (the last checkpoint is "
                f"{self.last_checkpoint or 'none'}). Lower lr or check the data.")

    def save(self) -> Path:
        self.check_weights()
        path = ckpt.save_checkpoint(self.ckpt_root, self.step, self.model, self.optimizer,
                                    self.ema.shadow if self.ema else None,
                                    self.loader.state_dict(), self.dist.rank,
                                    keep=self.cfg.keep_checkpoints,
                                    write_extra=self._write_extra)
        self.last_checkpoint = path
        return path

    def _write_extra(self, directory: Path):
        """A checkpoint is self-contained: generate / eval / export need only its directory."""
        save_config(self.cfg, directory / "config.yaml", runtime=False)
        if self.tokenizer is not None:
            (directory / "tokenizer").mkdir(exist_ok=True)
            self.tokenizer.save(directory / "tokenizer")
            # Its markers and conditions, which a tokenizer.json of another tool does not hold.
            write_json(directory / "tokenizer" / hrm_text.TOKENIZER_INFO_FILE,
                       hrm_text.tokenizer_info(self.tokenizer))

    def resume(self, where: str | Path | None = None) -> Path:
        step, local, path = ckpt.load_checkpoint(where or self.ckpt_root, self.model,
                                                 self.optimizer,
                                                 self.ema.shadow if self.ema else None,
                                                 self.dist.rank)
        self.loader.load_state_dict(local["loader"])
        ckpt.set_rng_state(local["rng"])
        self.step = step
        self.last_checkpoint = path
        self.best.load(self.ckpt_root, self.dist.rank)
        return path

    # -- one optimizer step ------------------------------------------------------------------
    def train_step(self, batches: list) -> dict:
        model, cfg = self.model, self.cfg
        # HRM-Text's bp warm-up counts optimizer steps from 1 (it increments before the step).
        model.bp_steps = bp_steps_at(cfg.model, self.step + 1, cfg.steps)
        local_tokens = sum((b.labels != IGNORE_INDEX).sum() for b in batches)
        global_tokens = all_reduce(local_tokens.to(torch.float32))
        scale = self.dist.world_size / global_tokens.clamp(min=1)
        totals = torch.zeros(len(_STAT_KEYS), device=self.device, dtype=torch.float64)
        rows, flops = 0, 0.0
        for i, batch in enumerate(batches):
            if self.dist.distributed:
                model.set_requires_gradient_sync(i == len(batches) - 1)
            head_rows = _head_rows(batch)
            with autocast_for(cfg, self.device):
                logits = model(batch.inputs, batch.position_ids, batch.info, rows=head_rows)
            stats = batch_stats(logits, batch.labels, batch.info, head_rows)
            (stats["ce_sum"] * scale).backward()
            totals += torch.stack([stats[k].detach().double() for k in _STAT_KEYS])
            rows += batch.info.total
            flops += step_flops(cfg.model, batch.info.total, useful_pairs(batch.info),
                                None if head_rows is None else len(head_rows), model.bp_steps)
        # Ranks asking to stop (a SIGTERM) ride on the statistics' all-reduce: every rank reads the
        # same sum, so all stop after the same step.
        stop_vote = totals.new_zeros(1)
        if self.stop is not None and self.stop.requested:
            stop_vote += 1
        totals = all_reduce(torch.cat([totals, stop_vote]))
        # The norm is queued before the host reads anything, so one sync serves the statistics
        # and the norm, and the GPU does not wait for the host to launch the clip between them.
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        *sums, stop_votes, grad_norm = torch.cat([totals, grad_norm.to(totals).reshape(1)]
                                                 ).tolist()
        values = dict(zip(_STAT_KEYS, sums))  # the one host sync of the step
        if int(values["tokens"]) != int(global_tokens.item()):
            self.optimizer.zero_grad(set_to_none=True)
            raise ValueError(
                f"the batches' supervised_rows list {int(values['tokens'])} supervised rows but "
                f"their labels have {int(global_tokens.item())}: supervised_rows must hold every "
                f"row whose label is not {IGNORE_INDEX} (or be None)")
        loss = values["ce_sum"] / max(values["tokens"], 1)
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"loss is {loss} at step {self.step + 1}; stopped before the optimizer step "
                f"(the last checkpoint is {self.last_checkpoint or 'none'}). Lower lr or check "
                "the data of this step.")
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                f"gradient norm is {grad_norm} at step {self.step + 1} (loss {loss:.4f}); stopped "
                "before the optimizer step")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(model, self.step)
        self.step += 1
        samples = max(values["samples"], 1)
        return {"loss": loss, "token_acc": values["correct"] / max(values["tokens"], 1),
                "exact_acc": values["exact"] / samples, "grad_norm": grad_norm,
                "tokens": int(values["tokens"]), "rows": rows, "flops": flops,
                "bp_steps": model.bp_steps, "stop": stop_votes > 0}

    # -- the loop -----------------------------------------------------------------------------
    def fit(self, progress=None, until: int | None = None) -> list[dict]:
        """Train up to step `cfg.steps` (or `until`, for stopping early on the same schedule)."""
        cfg, dist = self.cfg, self.dist
        last = cfg.steps if until is None else min(until, cfg.steps)
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
        self.log.start(self.step)
        iterator = iter(self.loader)
        bar = None
        if progress is None:
            progress = cfg.progress and dist.is_main
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step",
                       dynamic_ncols=True)
        window_start, window_rows, window_flops = time.perf_counter(), 0, 0.0
        try:
            while self.step < last:
                lr = lr_at(self.step, cfg)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                batches = [next(iterator) for _ in range(cfg.grad_accum)]
                stats = self.train_step(batches)
                window_rows += stats["rows"]
                window_flops += stats["flops"]
                record = {"kind": "train", "step": self.step, "loss": stats["loss"],
                          "token_acc": stats["token_acc"], "exact_acc": stats["exact_acc"],
                          "grad_norm": stats["grad_norm"], "lr": lr,
                          "supervised_tokens": stats["tokens"]}
                if cfg.model.arch == "hrm":
                    record["bp_steps"] = stats["bp_steps"]
                self.history.append(record)
                if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    record["tokens_per_s"] = window_rows * dist.world_size / elapsed
                    record["tokens_per_s_per_device"] = window_rows / elapsed
                    if self.peak:
                        record["mfu"] = window_flops / elapsed / self.peak
                    window_start, window_rows, window_flops = time.perf_counter(), 0, 0.0
                    self.log.write(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{stats['loss']:.3f}", acc=f"{stats['token_acc']:.3f}",
                                    lr=f"{lr:.1e}")
                # A stop request skips the evaluation: the grace period before a scheduler's
                # kill is for the checkpoint.
                if cfg.eval_every and self.step % cfg.eval_every == 0 and not stats["stop"]:
                    self.evaluate()
                if ((cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == last
                        or stats["stop"]) and self._saved_step() != self.step:
                    self.save()
                if stats["stop"]:
                    self.stopped = self.step
                    break
        finally:
            if bar is not None:
                bar.close()
        return self.history

    # -- evaluation ----------------------------------------------------------------------------
    def _setup_evaluation(self, tokenizer):
        from .evaluation import BestCheckpoint, tasks_from_config

        self.eval_tasks = tasks_from_config(self.cfg)
        if self.eval_tasks and tokenizer is None:
            raise ValueError("eval_tasks need the run's tokenizer (Trainer(tokenizer=...))")
        self.best = BestCheckpoint(self.cfg)
        if self.best.enabled and self.eval_batches is None and not self.eval_tasks:
            raise ValueError(f"best_metric={self.cfg.best_metric} needs an evaluation: held-out "
                             "data (eval_data, or the synthetic task's split) or eval_tasks")
        self._evaluated: tuple[int, dict] | None = None

    def _saved_step(self) -> int | None:
        return None if self.last_checkpoint is None else ckpt.step_of(self.last_checkpoint)

    def evaluate(self) -> dict | None:
        """Held-out loss, token accuracy and exact match, and the eval_tasks' metrics as
        "TASK/METRIC", on the EMA weights when the run uses them; logged as an eval record; the
        checkpoint of this step kept as the best one when it beats the best so far. Once per
        step (a second call returns the first's result)."""
        if self.eval_batches is None and not self.eval_tasks:
            return None
        if self._evaluated is not None and self._evaluated[0] == self.step:
            return self._evaluated[1]
        context = (self.ema.swapped_in(self.model) if self.ema is not None and self.cfg.use_ema
                   else contextlib.nullcontext())
        result = {}
        with context:
            if self.eval_batches is not None:
                result.update(evaluate(self.model, self.eval_batches(), self.cfg, self.device))
            if self.eval_tasks:
                from .evaluation import task_metrics

                self.model.eval()
                result.update(task_metrics(self.model, self.tokenizer, self.eval_tasks, self.cfg,
                                           self.dist.distributed,
                                           autocast_for(self.cfg, self.device)))
                self.model.train()
        self.log.write({"kind": "eval", "step": self.step, **result})
        self._evaluated = (self.step, result)
        if self.best.enabled and self.best.improves(result):
            if self._saved_step() != self.step:
                self.save()
            self.best.keep(self.ckpt_root, self.last_checkpoint, self.step, result,
                           self.dist.rank)
        return result

    def close(self):
        self.log.close()
