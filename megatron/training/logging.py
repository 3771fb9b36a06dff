"""What a run reports: Megatron's log line, one JSON object per logged iteration, TensorBoard scalars.

The same numbers feed all three, so the JSON is a faithful machine-readable copy of the log line.
"""

import json
import math
import os
import time
from typing import Optional

import torch.distributed as dist

from megatron.core import parallel_state as ps


# JSON key -> TensorBoard tag (Megatron's tag names where it has one)
TB_TAGS = {"lm_loss": "lm loss", "lr": "learning-rate", "grad_norm": "grad-norm", "loss_scale": "loss-scale",
           "tokens_per_sec": "tokens-per-second", "kept_length": "kept-length",
           "consumed_layer_tokens": "consumed-layer-tokens", "layer_token_saving": "layer-token-saving",
           "throughput_tflops": "throughput", "dense_equivalent_tflops": "dense-equivalent-throughput", "mfu": "mfu"}


def print_rank_0(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def is_logging_rank() -> bool:
    """The last pipeline stage's first rank: the one that has the loss and prints the log line."""
    return ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0


def timestamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _tflops(value: float) -> str:
    return f"{value:.1f}" if value >= 1 else f"{value:.3g}"  # Megatron's .1f; a CPU's few GFLOP/s legible


def format_train_line(m: dict, metric_names=("lm loss",)) -> str:
    """Megatron's training log line. The LTD fields are printed only when `m["random_ltd"]` is true, so a
    dense run's line is Megatron's (the JSON record keeps them either way). `metric_names` are the loss_fn
    metrics ("lm loss", "sop loss", ...), read from `m` under their underscored keys. With --log-throughput:
    Megatron's TFLOP/s field, then (random-LTD) the dense-equivalent TFLOP/s and, with a known peak, MFU."""
    parts = [
        f" [{timestamp()}] iteration {m['iteration']:8d}/{m['train_iters']:8d}",
        f"consumed samples: {m['consumed_samples']:12d}",
        f"elapsed time per iteration (ms): {m['elapsed_ms_per_iteration']:.1f}",
    ]
    if "throughput_tflops" in m:
        parts.append(f"throughput per GPU (TFLOP/s/GPU): {_tflops(m['throughput_tflops'])}")
        if m.get("random_ltd"):
            parts.append(f"dense-equivalent throughput per GPU (TFLOP/s/GPU): {_tflops(m['dense_equivalent_tflops'])}")
        if "mfu" in m:
            parts.append(f"MFU: {100 * m['mfu']:.1f}%")
    parts += [
        f"tokens per second: {m['tokens_per_sec']:.1f}",
        f"learning rate: {m['lr']:.6E}",
        f"global batch size: {m['global_batch_size']:5d}",
    ]
    parts += [f"{name}: {m[name.replace(' ', '_')]:.6E}" for name in metric_names]
    if m.get("random_ltd"):
        parts += [
            f"kept length: {m['kept_length']:5d}",
            f"consumed layer tokens: {m['consumed_layer_tokens']:d}",
            f"layer-token saving: {100 * m['layer_token_saving']:.2f}%",
        ]
    parts += [
        f"loss scale: {m['loss_scale']:.1f}",
        f"grad norm: {m['grad_norm']:.3f}",
        f"number of skipped iterations: {m['skipped_iterations']:3d}",
        f"number of nan iterations: {m['nan_iterations']:3d}",
    ]
    return " | ".join(parts) + " |"


def format_validation_block(iteration: int, loss: float, name: str = "validation", others=None) -> str:
    """Megatron's block: ` validation loss at iteration N on {validation,test} set | ...` (Megatron says
    "validation loss" for the test set too). `others`: further metrics {"sop loss": value, ...}, printed
    as `sop loss value: ...`."""
    ppl = math.exp(min(20.0, loss))
    line = (f" validation loss at iteration {iteration} on {name} set | lm loss value: {loss:.6E} | "
            f"lm loss PPL: {ppl:.6E} | ")
    line += "".join(f"{k} value: {v:.6E} | " for k, v in (others or {}).items())
    dashes = "-" * len(line)
    return f"{dashes}\n{line}\n{dashes}"


class RunLogger:
    """Writes the log line to stdout, JSON lines to `--log-json`, scalars to `--tensorboard-dir`."""

    def __init__(self, log_json: Optional[str] = None, tensorboard_dir: Optional[str] = None, enabled: bool = True):
        # Opened on first write, so a run that fails before its first logged iteration leaves no files.
        # Only one rank of a parallel run logs (enabled); the others stay silent.
        self.enabled = enabled
        self.log_json, self.tensorboard_dir = log_json, tensorboard_dir
        self.json_file = None
        self._tb = None

    @property
    def tb(self):
        if self._tb is None and self.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # tensorboard is a dependency; import is slow

            self._tb = SummaryWriter(log_dir=self.tensorboard_dir)
        return self._tb

    def train(self, metrics: dict, metric_names=("lm loss",)) -> None:
        if not self.enabled:
            return
        print(format_train_line(metrics, metric_names), flush=True)
        self._json(metrics)
        if self.tb:
            step = metrics["iteration"]
            for key, tag in TB_TAGS.items():
                if key in metrics:
                    self.tb.add_scalar(tag, metrics[key], step)
            for name in metric_names:
                if name.replace(" ", "_") not in TB_TAGS:
                    self.tb.add_scalar(name, metrics[name.replace(" ", "_")], step)
            self.tb.add_scalar("lm loss vs samples", metrics["lm_loss"], metrics["consumed_samples"])
            if "consumed_layer_tokens" in metrics:
                self.tb.add_scalar("lm loss vs layer tokens", metrics["lm_loss"], metrics["consumed_layer_tokens"])

    def validation(self, iteration: int, consumed_samples: int, loss: float, name: str = "validation",
                   extra: Optional[dict] = None, metrics: Optional[dict] = None) -> None:
        """`metrics`: loss_fn metrics besides "lm loss" ({"sop loss": v}), logged as `{val,test}_sop_loss`."""
        if not self.enabled or loss is None:
            return
        print(format_validation_block(iteration, loss, name, metrics), flush=True)
        key = "val" if name == "validation" else name
        record = {"iteration": iteration, "consumed_samples": consumed_samples,
                  f"{key}_loss": loss, f"{key}_ppl": math.exp(min(20.0, loss)),
                  **{f"{key}_{k.replace(' ', '_')}": v for k, v in (metrics or {}).items()}, **(extra or {})}
        self._json(record)
        if self.tb:
            self.tb.add_scalar(f"lm loss {name}", loss, iteration)
            self.tb.add_scalar(f"lm loss {name} ppl", record[f"{key}_ppl"], iteration)

    def _json(self, record: dict) -> None:
        if self.log_json and self.json_file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.log_json)), exist_ok=True)
            self.json_file = open(self.log_json, "a")
        if self.json_file:
            self.json_file.write(json.dumps(record) + "\n")
            self.json_file.flush()

    def close(self) -> None:
        if self.json_file:
            self.json_file.close()
        if self._tb:
            self._tb.close()
