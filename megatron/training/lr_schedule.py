"""Megatron's learning-rate schedule, driven by progress measured in samples or in layer-tokens.

Megatron's OptimizerParamScheduler counts progress in samples: warmup and decay lengths given in
iterations are multiplied by the global batch, tokens are divided by the sequence length. The LR is a
pure function of the progress *before* an iteration, so the LR reported for iteration k is exactly the
one its optimizer step used, and nothing but the consumed counters needs checkpointing.

LayerToken LR (`--layer-token-lr-schedule`): the progress is the dense-equivalent sample count
`C / (L * s)` where `C` is the layer-tokens consumed so far. Dense training consumes exactly `L * s`
layer-tokens per sample, so with random-LTD off both progress measures are equal and so are the LRs.
"""

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

from megatron.core.errors import UserError

DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


@dataclass(frozen=True)
class LRScheduleConfig:
    max_lr: float
    min_lr: float
    decay_style: str
    warmup_samples: float  # progress units: samples (dense-equivalent with layer tokens)
    decay_samples: float
    layer_tokens: bool = False  # --layer-token-lr-schedule: progress is C / (L * s), not samples

    def state_dict(self, num_steps: int, num_layer_tokens: int) -> dict:
        """Megatron's `opt_param_scheduler` checkpoint entry (lengths and progress in samples), plus the
        layer-token progress; `num_steps` counts successful steps only, as Megatron's does."""
        return {"max_lr": self.max_lr, "min_lr": self.min_lr, "lr_warmup_steps": self.warmup_samples,
                "lr_decay_steps": self.decay_samples, "lr_decay_style": self.decay_style, "num_steps": num_steps,
                "num_layer_tokens": num_layer_tokens}

    def progress(self, samples: int, layer_tokens: int, num_layers: int, seq_length: int) -> float:
        """Schedule progress before an iteration, in this schedule's unit."""
        return progress_samples(samples, layer_tokens, num_layers, seq_length, self.layer_tokens)

    def __post_init__(self):
        if self.decay_style not in DECAY_STYLES:
            raise UserError(f"--lr-decay-style must be one of {DECAY_STYLES}, got {self.decay_style!r}")
        if self.max_lr < 0 or self.min_lr < 0 or self.min_lr > self.max_lr:
            raise UserError(f"need 0 <= --min-lr ({self.min_lr}) <= --lr ({self.max_lr})")
        if self.warmup_samples < 0:
            raise UserError("the LR warmup length must not be negative")
        if self.decay_style != "constant" and self.decay_samples <= self.warmup_samples:
            raise UserError(
                f"LR decay length ({self.decay_samples:g} samples) must exceed the warmup "
                f"({self.warmup_samples:g} samples); shorten --lr-warmup-* or lengthen --lr-decay-*"
            )


def lr_at(cfg: LRScheduleConfig, progress: float) -> float:
    """The LR after `progress` samples (Megatron's formula)."""
    if cfg.warmup_samples > 0 and progress <= cfg.warmup_samples:
        return cfg.max_lr * progress / cfg.warmup_samples
    if cfg.decay_style == "constant":
        return cfg.max_lr
    if cfg.decay_style == "inverse-square-root":
        warmup = max(cfg.warmup_samples, 1)
        return max(cfg.min_lr, cfg.max_lr * math.sqrt(warmup) / math.sqrt(max(progress, 1)))
    if progress > cfg.decay_samples:
        return cfg.min_lr
    ratio = (progress - cfg.warmup_samples) / (cfg.decay_samples - cfg.warmup_samples)
    if cfg.decay_style == "linear":
        coeff = 1.0 - ratio
    else:  # cosine
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    return cfg.min_lr + coeff * (cfg.max_lr - cfg.min_lr)


def progress_samples(consumed_samples: int, consumed_layer_tokens: int, num_layers: int, seq_length: int,
                     layer_token_schedule: bool) -> float:
    """Schedule progress before an iteration: samples, or dense-equivalent samples from layer-tokens."""
    if layer_token_schedule:
        return float(Fraction(consumed_layer_tokens, num_layers * seq_length))
    return float(consumed_samples)


def schedule_lengths(*, global_batch_size: int, seq_length: int, train_samples: int,
                     warmup_iters: int = 0, warmup_samples: int = 0, warmup_tokens: int = 0,
                     warmup_fraction: Optional[float] = None,
                     decay_iters: Optional[int] = None, decay_samples: Optional[int] = None,
                     decay_tokens: Optional[int] = None):
    """Megatron's rules turning the --lr-warmup-*/--lr-decay-* flags into (warmup, decay) in samples."""
    if decay_samples:
        decay = float(decay_samples)
    elif decay_iters:
        decay = float(decay_iters * global_batch_size)
    elif decay_tokens:
        decay = decay_tokens / seq_length
    else:
        decay = float(train_samples)
    given = [x for x in (warmup_iters, warmup_samples, warmup_tokens) if x] + (
        [warmup_fraction] if warmup_fraction is not None else [])
    if len(given) > 1:
        raise UserError("give at most one of --lr-warmup-iters, --lr-warmup-samples, --lr-warmup-tokens, "
                        "--lr-warmup-fraction")
    if warmup_fraction is not None:
        if not 0.0 <= warmup_fraction <= 1.0:
            raise UserError(f"--lr-warmup-fraction must be in [0, 1], got {warmup_fraction}")
        warmup = warmup_fraction * decay
    elif warmup_samples:
        warmup = float(warmup_samples)
    elif warmup_tokens:
        warmup = warmup_tokens / seq_length
    else:
        warmup = float(warmup_iters * global_batch_size)
    return warmup, decay
