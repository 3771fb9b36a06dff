"""Random-LTD settings: which layers drop tokens and how the kept length grows.

Layer numbers here are GLOBAL and 0-based (layer 0 is the first transformer layer of the whole model, not
of a pipeline stage), so the LTD set and the sampler's per-layer randomness are the same in every
parallel layout. The default set is every layer except the first and the last: the paper's ablation
(Table 5) finds those two the most sensitive to dropping.

Validation needs the model's size, so it is a method, `validate(num_layers, seq_length)`, that the
argument parser (or a test) calls once; a disabled config is never checked, so its defaults may not fit a
tiny model.
"""

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Tuple, Union

from megatron.core.errors import UserError


def default_ltd_layers(num_layers: int) -> Tuple[int, ...]:
    """Every layer but the first and the last: 1..L-2 (empty for L <= 2)."""
    return tuple(range(1, num_layers - 1))


def parse_layer_spec(spec: str, num_layers: int) -> Tuple[int, ...]:
    """Parse `--random-ltd-layers`: 0-based indices and inclusive ranges, e.g. "1-22" or "1-5,7,9-10".

    Returns the sorted, de-duplicated layer numbers. Spaces are ignored.
    """
    text = spec.replace(" ", "")
    if not text:
        raise UserError("--random-ltd-layers is empty; give 0-based layer indices such as 1-22 or 1-5,7")
    layers = set()
    for part in text.split(","):
        lo_text, dash, hi_text = part.partition("-")
        if not lo_text.isdigit() or (dash and not hi_text.isdigit()):
            raise UserError(
                f"--random-ltd-layers: cannot read {part!r} in {spec!r}; "
                "use 0-based indices and ranges such as 1-22 or 1-5,7,9-10"
            )
        lo = int(lo_text)
        hi = int(hi_text) if dash else lo
        if hi < lo:
            raise UserError(f"--random-ltd-layers: range {part!r} runs backwards; write it as {hi}-{lo}")
        if hi >= num_layers:
            raise UserError(
                f"--random-ltd-layers: layer {hi} is out of range for --num-layers {num_layers}; "
                f"indices are 0-based, so use 0..{num_layers - 1}"
            )
        layers.update(range(lo, hi + 1))
    return tuple(sorted(layers))


def check_schedule_values(seq_length: int, start_seq_length: int, seq_step: int, ramp_iters: Optional[int]):
    """Raise UserError unless (s, r_0, q, T_r) make a valid MSLG schedule.

    r_0 < q would start at zero kept tokens (r is rounded down to a multiple of q); r_0 > s cannot grow
    towards s.
    """
    if seq_step < 1:
        raise UserError(f"--random-ltd-seq-step {seq_step} must be at least 1; use e.g. 16 (or 8)")
    if start_seq_length > seq_length:
        raise UserError(
            f"--random-ltd-start-seq-length {start_seq_length} is larger than --seq-length {seq_length}; "
            "use a start length no larger than the sequence length"
        )
    if start_seq_length < seq_step:
        raise UserError(
            f"--random-ltd-start-seq-length {start_seq_length} is smaller than --random-ltd-seq-step "
            f"{seq_step}, so it would keep 0 tokens; use a start length of at least one step"
        )
    if ramp_iters is None:
        raise UserError("--random-ltd needs --random-ltd-ramp-iters or --random-ltd-ramp-fraction")
    if ramp_iters < 1:
        raise UserError(f"--random-ltd-ramp-iters {ramp_iters} must be at least 1")


def ramp_iters_from_fraction(fraction: Union[float, str, Fraction], train_iters: int) -> int:
    """T_r for `--random-ltd-ramp-fraction f`: ceil(f * train_iters), computed exactly.

    The fraction is read through its decimal text (0.7 means 7/10, not the nearest binary float), and
    rounded up so the ramp never ends before the given share of training.
    """
    f = Fraction(str(fraction)) if isinstance(fraction, float) else Fraction(fraction)
    if not 0 < f <= 1:
        raise UserError(f"--random-ltd-ramp-fraction {fraction} must be in (0, 1]; e.g. 0.7")
    if train_iters < 1:
        raise UserError(f"training length of {train_iters} iterations leaves no room for a ramp")
    return max(1, math.ceil(f * train_iters))


@dataclass(frozen=True)
class RandomLTDConfig:
    """Random-LTD flags, as plain data.

    Call `validate(num_layers, seq_length)` before use; `ltd_layers(num_layers)` resolves the layer set.
    """

    enabled: bool = False
    """`--random-ltd`: drop tokens in the LTD layers during training."""

    start_seq_length: int = 128
    """`--random-ltd-start-seq-length` r_0: tokens kept per sample at iteration 0."""

    seq_step: int = 16
    """`--random-ltd-seq-step` q: r grows in multiples of q (8/16 keep matmul shapes tensor-core friendly)."""

    ramp_iters: Optional[int] = None
    """`--random-ltd-ramp-iters` T_r: iterations for r to grow linearly from r_0 to s (see schedule.py)."""

    layers: Optional[Tuple[int, ...]] = None
    """Global 0-based layer numbers that drop tokens; None means `default_ltd_layers`."""

    def __post_init__(self):
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(set(int(layer) for layer in self.layers))))

    def ltd_layers(self, num_layers: int) -> Tuple[int, ...]:
        """The LTD set for a model of `num_layers` layers (empty when disabled)."""
        if not self.enabled:
            return ()
        return self.layers if self.layers is not None else default_ltd_layers(num_layers)

    def validate(self, num_layers: int, seq_length: int) -> "RandomLTDConfig":
        """Raise UserError for a setting that cannot run on this model; return self."""
        if not self.enabled:
            return self
        check_schedule_values(seq_length, self.start_seq_length, self.seq_step, self.ramp_iters)
        bad = [layer for layer in (self.layers or ()) if not 0 <= layer < num_layers]
        if bad:
            raise UserError(
                f"--random-ltd-layers: layer {bad[0]} is out of range for --num-layers {num_layers}; "
                f"indices are 0-based, so use 0..{num_layers - 1}"
            )
        if not self.ltd_layers(num_layers):
            raise UserError(
                f"--random-ltd with --num-layers {num_layers} leaves no layer to drop tokens in (the first "
                "and last run on all tokens); name layers with --random-ltd-layers or use more layers"
            )
        return self
