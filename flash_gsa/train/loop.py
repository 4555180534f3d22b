"""The training loop: `train(cfg, out_dir)` and the `Trainer` behind it.

One optimizer step = `grad_accum` packed micro-batches (loss weighted by predicted tokens, across micro-batches and
ranks), gradient clipping, a non-finite check (skip the update, count it, stop after `max_nonfinite`), AdamW and the
warm-up + cosine schedule. Validation perplexity every `eval_every` steps, checkpoints every `save_every`, a JSONL
metrics line every `log_every`, a progress bar with loss, tokens/s, MFU and ETA. At the end the model (safetensors,
loadable with `from_pretrained`), its tokenizer, the config, the log and a loss-curve PNG are in the run folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import (
    CHECKPOINTS,
    list_checkpoints,
    read_training_files,
    rng_state,
    save_atomically,
    set_rng_state,
    write_training_files,
)
from .config import TrainConfig
from .data import PackedData, token_cache
from .metrics import MetricsLog, flops_per_token, peak_flops
from .optim import build_optimizer, build_scheduler
from .plot import plot_runs
from .tokenizer import load_tokenizer

CONFIG_FILE = "train_config.json"
PLOT_FILE = "loss.png"


class NonFiniteLossError(RuntimeError):
    """Too many steps had a non-finite loss or gradient norm."""


@dataclass
class StepStats:
    loss: float  # mean over the step's predicted tokens, all ranks
    grad_norm: float  # before clipping
    lr: float  # the learning rate the step used
    skipped: bool  # not applied: the loss or the gradient norm was not finite


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    val_loss: float
    val_ppl: float
    sample: str | None
    train_seconds: float  # time spent in training steps, over every invocation of the run
    nonfinite: int


def perplexity(loss: float) -> float:
    """exp(loss), saturating instead of overflowing."""
    return math.exp(min(loss, 700.0))


class Trainer:
    """Builds everything for a run (data, model, optimizer, possibly from a checkpoint) and trains it.

    Args:
        cfg: the run's configuration.
        out_dir: the run folder.
        resume: continue from the newest checkpoint in `out_dir` (start fresh when there is none).
        overwrite: without `resume`, replace a previous run's checkpoints and log in `out_dir` instead of refusing.
        show_progress: progress bars (tokenizing, training) on rank 0.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        out_dir: str | Path,
        resume: bool = False,
        overwrite: bool = False,
        show_progress: bool = True,
    ) -> None:
        from ..models import GSAConfig, GSAForCausalLM

        self.cfg, self.out = cfg, Path(out_dir)
        self.show_progress = show_progress
        self.dist = info = distributed.setup(cfg.device)
        self.device = info.device
        if cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda"):
            self.autocast = functools.partial(torch.autocast, self.device.type, dtype=torch.bfloat16)
            self.precision = "bf16"
        else:
            self.autocast, self.precision = contextlib.nullcontext, "fp32"

        ckpt = self._prepare_out_dir(resume, overwrite)
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        if info.local_rank == 0:  # one process per machine tokenizes; the others open its cache
            token_cache(cfg.data, self.tokenizer, cfg.cache_dir, show_progress)
        distributed.barrier(info)
        tokens = token_cache(cfg.data, self.tokenizer, cfg.cache_dir, show_progress=False)
        self.data = PackedData(tokens, cfg.seq_len, cfg.val_fraction, cfg.seed, info.rank, info.world_size)
        self.data.batches_per_epoch(cfg.batch_size)  # fails early and clearly when the data is too small

        torch.manual_seed(cfg.seed)
        if ckpt is not None:
            model = GSAForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        else:
            model = GSAForCausalLM(GSAConfig(**self._model_kwargs()))
        if model.config.vocab_size < self.tokenizer.vocab_size:
            raise ValueError(
                f"model.vocab_size {model.config.vocab_size} is smaller than the tokenizer's "
                f"{self.tokenizer.vocab_size}"
            )
        self.hf_model = model.to(self.device)
        self.flops_per_token = flops_per_token(model, cfg.seq_len)
        self.n_params = sum(p.numel() for p in model.parameters())
        if cfg.activation_checkpointing:  # each block recomputes its activations in the backward pass
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model = distributed.wrap(model, cfg.parallel, info, list(model.model.layers))
        if cfg.compile:
            self.model.compile()

        self.optimizer = build_optimizer(
            self.model, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), fused=self.device.type == "cuda"
        )
        self.scheduler = build_scheduler(self.optimizer, min(cfg.warmup_steps, cfg.steps), cfg.steps, cfg.min_lr_ratio)
        self.step = self.micro_batch = self.tokens = self.nonfinite = 0
        self.elapsed = 0.0
        if ckpt is not None:
            self._load_training_state(ckpt)
        self.peak = peak_flops(self.device, self.precision, cfg.peak_tflops)
        self.log = None
        if info.is_main:
            dataclasses.replace(cfg, stop_at=None).save(self.out / CONFIG_FILE)  # stop_at is per invocation
            self.tokenizer.save_pretrained(self.out)
            self.log = MetricsLog(self.out, truncate_after_step=self.step, fresh=ckpt is None)

    # -- set-up helpers ----------------------------------------------------------------------------------------
    def _prepare_out_dir(self, resume: bool, overwrite: bool) -> Path | None:
        """Returns the checkpoint to resume from, if any; refuses to mix a fresh run into an old one."""
        existing = list_checkpoints(self.out)
        if resume and existing:
            self._say(f"resuming from {existing[-1]}")
            return existing[-1]
        if resume:
            self._say(f"no checkpoint in {self.out}: starting from scratch")
        elif existing and not overwrite:
            raise ValueError(
                f"{self.out} already holds a run (checkpoints up to {existing[-1].name}); "
                "resume it with --resume, replace it with --overwrite, or choose another --out"
            )
        distributed.barrier(self.dist)
        if self.dist.is_main:
            shutil.rmtree(self.out / CHECKPOINTS, ignore_errors=True)
            self.out.mkdir(parents=True, exist_ok=True)
        distributed.barrier(self.dist)
        return None

    def _model_kwargs(self) -> dict:
        kwargs = dict(self.cfg.model)
        kwargs.setdefault("vocab_size", self.tokenizer.vocab_size)
        for name in ("bos_token_id", "eos_token_id"):
            kwargs.setdefault(name, getattr(self.tokenizer, name))
        return kwargs

    def _load_training_state(self, ckpt: Path) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        optim_state, state = read_training_files(ckpt)
        set_optimizer_state_dict(
            self.model, self.optimizer, optim_state, options=StateDictOptions(full_state_dict=True)
        )
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step, self.micro_batch, self.tokens = state["step"], state["micro_batch"], state["tokens"]
        self.nonfinite, self.elapsed = state["nonfinite"], state["elapsed"]
        if state["world_size"] != self.dist.world_size:
            self._say(
                f"the checkpoint was written by {state['world_size']} rank(s), this run has {self.dist.world_size}: "
                "the data order will differ from an uninterrupted run"
            )

    def _say(self, msg: str) -> None:
        if self.dist.is_main:
            tqdm.write(msg, file=sys.stderr)

    # -- one step, validation, checkpoint --------------------------------------------------------------------------
    def train_step(self) -> StepStats:
        """One optimizer step (skipped, and counted, when the loss or the gradient norm is not finite)."""
        cfg, info = self.cfg, self.dist
        batches = [self.data.train_batch(self.micro_batch + i, cfg.batch_size) for i in range(cfg.grad_accum)]
        self.micro_batch += cfg.grad_accum
        n_total = float(sum(b.num_targets for b in batches))  # predicted tokens of this step, all ranks
        if info.distributed:
            n_total = distributed.all_reduce_sum(torch.tensor(n_total, dtype=torch.float64, device=self.device), info)
            n_total = n_total.item()
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(batches):
            batch = batch.to(self.device)
            with distributed.gradient_sync(self.model, i == len(batches) - 1):
                with self.autocast():
                    out = self.model(input_ids=batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens)
                loss = out.loss.float()
                # Weighted so the gradient is that of the mean over every predicted token of the step, all ranks
                # included (DDP and FSDP average over ranks, hence the world_size).
                (loss * (batch.num_targets * info.world_size / max(n_total, 1.0))).backward()
            loss_sum += loss.detach() * batch.num_targets
        max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
            grad_norm = grad_norm.full_tensor()
        loss_mean = distributed.all_reduce_sum(loss_sum, info) / max(n_total, 1.0)
        finite = bool(torch.isfinite(loss_mean) & torch.isfinite(grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        if finite:
            self.optimizer.step()
        else:
            self.nonfinite += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        self.tokens += cfg.tokens_per_step * info.world_size
        return StepStats(loss_mean.item(), grad_norm.item(), lr, not finite)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss per predicted token, over `eval_batches` micro-batches per rank."""
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)
        for batch in self.data.val_batches(self.cfg.batch_size, self.cfg.eval_batches):
            batch = batch.to(self.device)
            with self.autocast():
                out = self.model(input_ids=batch.input_ids, labels=batch.labels, cu_seqlens=batch.cu_seqlens)
            total[0] += out.loss.double() * batch.num_targets
            total[1] += batch.num_targets
        distributed.all_reduce_sum(total, self.dist)
        self.model.train()
        return (total[0] / total[1]).item()

    def save_checkpoint(self, final: bool = False) -> Path | None:
        """Write a checkpoint of the current step (rank 0 writes; every rank takes part in gathering). `final` also
        writes the model into the run folder itself. Returns the checkpoint folder on rank 0."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.model, options=opts)
        optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=opts)
        path = None
        if self.dist.is_main:
            state = {
                "step": self.step,
                "micro_batch": self.micro_batch,
                "tokens": self.tokens,
                "nonfinite": self.nonfinite,
                "elapsed": self.elapsed,
                "world_size": self.dist.world_size,
                "scheduler": self.scheduler.state_dict(),
                "rng": rng_state(),
            }

            def write(folder: Path) -> None:
                self.hf_model.save_pretrained(folder, state_dict=dict(model_state))  # (it empties the dict)
                write_training_files(folder, optim_state, state)

            path = save_atomically(self.out, self.step, write, self.cfg.keep_last)
            if final:
                self.hf_model.save_pretrained(self.out, state_dict=dict(model_state))
        distributed.barrier(self.dist)
        return path

    # -- the loop -------------------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to `stop_at` (or `steps`), then validate, checkpoint, plot and sample."""
        cfg, info = self.cfg, self.dist
        end = cfg.stop_at or cfg.steps
        self._say(
            f"model: {self.n_params / 1e6:.2f}M parameters, mixer {self.hf_model.config.mixer}; data: "
            f"{len(self.data.data.tokens):,} tokens, {len(self.data.train_rows):,} training rows of {cfg.seq_len}; "
            f"device {self.device} x {info.world_size}, {self.precision}"
        )
        bar = tqdm(
            total=end,
            initial=self.step,
            desc="training",
            unit="step",
            disable=not (info.is_main and self.show_progress),
        )
        val_loss, last_eval = math.nan, -1
        window_tokens, window_time, rate = 0, 0.0, None  # tokens/s of the steps themselves (no eval, no saves)
        while self.step < end:
            t0 = time.perf_counter()
            stats = self.train_step()
            dt = time.perf_counter() - t0
            self.elapsed += dt
            step_tokens = cfg.tokens_per_step * info.world_size
            window_tokens, window_time = window_tokens + step_tokens, window_time + dt
            rate = step_tokens / dt if rate is None else 0.9 * rate + 0.1 * step_tokens / dt
            mfu = rate * self.flops_per_token / (self.peak * info.world_size) if self.peak else None
            bar.set_postfix_str(
                f"loss {stats.loss:.3f} | {rate:,.0f} tok/s | MFU " + (f"{mfu:.1%}" if mfu is not None else "-"),
                refresh=False,
            )
            bar.update(1)
            if stats.skipped:
                self._say(f"step {self.step}: non-finite loss or gradient; update skipped ({self.nonfinite} so far)")
                self._record({"step": self.step, "event": "nonfinite", "nonfinite": self.nonfinite})
                if self.nonfinite >= cfg.max_nonfinite:
                    bar.close()
                    raise NonFiniteLossError(
                        f"{self.nonfinite} steps had a non-finite loss or gradient (max_nonfinite = "
                        f"{cfg.max_nonfinite}); stopped at step {self.step}. The weights hold the last good update; "
                        "lower the learning rate or check the data, then --resume from the last checkpoint."
                    )
            if self.step % cfg.log_every == 0 or self.step == end:
                tps = window_tokens / window_time
                self._record(
                    {
                        "step": self.step,
                        "tokens": self.tokens,
                        "loss": stats.loss,
                        "lr": stats.lr,
                        "grad_norm": stats.grad_norm,
                        "tok_per_s": tps,
                        "mfu": tps * self.flops_per_token / (self.peak * info.world_size) if self.peak else None,
                        "elapsed_s": self.elapsed,
                    }
                )
                window_tokens, window_time = 0, 0.0
            if cfg.eval_every and self.step % cfg.eval_every == 0:
                val_loss, last_eval = self._validate(), self.step
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < end:
                self.save_checkpoint()
        bar.close()
        if last_eval != self.step:
            val_loss = self._validate()
        self.save_checkpoint(final=True)
        sample = None
        if info.is_main:
            self.log.close()
            plot_runs([self.out], self.out / PLOT_FILE)
            if cfg.sample_tokens:
                from .sample import generate, load_run

                model, tokenizer = load_run(self.out, self.device)
                sample = generate(model, tokenizer, cfg.sample_prompt, cfg.sample_tokens, seed=cfg.seed)
        distributed.barrier(info)
        return TrainResult(self.out, self.step, val_loss, perplexity(val_loss), sample, self.elapsed, self.nonfinite)

    def _validate(self) -> float:
        val_loss = self.evaluate()
        self._record({"step": self.step, "tokens": self.tokens, "val_loss": val_loss, "val_ppl": perplexity(val_loss)})
        return val_loss

    def _record(self, record: dict) -> None:
        if self.log is not None:
            self.log.write(record)


def train(
    cfg: TrainConfig,
    out_dir: str | Path,
    resume: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> TrainResult:
    """Train a model as `cfg` says into `out_dir` (see `Trainer`); tears the process group down afterwards."""
    try:
        return Trainer(cfg, out_dir, resume=resume, overwrite=overwrite, show_progress=show_progress).fit()
    finally:
        distributed.teardown()


__all__ = ["CONFIG_FILE", "PLOT_FILE", "NonFiniteLossError", "TrainResult", "Trainer", "train"]
