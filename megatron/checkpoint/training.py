"""What a training run saves and resumes from: the trainer's side of both checkpoint formats.

`--ckpt-format torch_dist` (the default, as in Megatron) is torch_dist.py: the same contents below, the
tensors as layout-free pieces written by every rank through DCP, the plain values in JSON; it resumes
in any layout. `--ckpt-format torch` is Megatron's legacy layout (protocol.py writes it):

One file per (tensor, pipeline) rank, written by data-parallel rank 0 of each, holding Megatron's keys so
its tools read ours:

    args                    the run's flags with Megatron's names (a plain dict, derived values filled in)
    config                  the resolved RunConfig, section by section, as plain dicts
    model                   this rank's state dict (stage-local layer numbers, TP shards), in the
                            parameter dtype (bf16/fp16 weights under --bf16/--fp16, as Megatron's)
    optimizer               this rank's optimizer state: Adam moments, the fp32 main parameters of a
                            16-bit model (`fp32_from_fp16_params`), the loss scaler
    opt_param_scheduler     LR schedule lengths and progress (successful steps only, as Megatron counts)
    rng_state               python, numpy, torch, cuda and the tensor-parallel tracker's streams
    train_state             iteration and counters (state.py); consumed_*_samples also at the top level
    random_ltd              consumed_layer_tokens and `current_value`: r_t, under DeepSpeed's key
    iteration, checkpoint_version

With `--use-distributed-optimizer` the Adam moments and fp32 main parameters are sharded over the DP
ranks; they are gathered into `distrib_optim.pt` beside the model file (Megatron's legacy name), per
parameter and in model space ({"param"|"exp_avg"|"exp_avg_sq": {name: tensor}, "step"}), so the file
loads at any data-parallel size and tools/checkpoint_util.py re-splits it for another TP/PP.

Resume checks what makes a checkpoint unusable before touching the model: another TP x PP layout
(convert it with tools/checkpoint_util.py) or other model flags (model_args.check_model_flags), then
loads strictly. `--finetune` takes the weights only. A checkpoint written by Megatron-LM (megatron_lm.py)
loads with `--finetune`, or with `--no-load-optim --no-load-rng` to continue its iteration count: its
optimizer and RNG states are never read.
"""

import os
import time
from typing import Callable, Mapping, Optional

import torch
import torch.distributed as dist

from megatron.checkpoint import protocol, torch_dist
from megatron.checkpoint.megatron_lm import IMPORTED
from megatron.checkpoint.naming import DISTRIB_OPTIM
from megatron.checkpoint.model_args import check_model_flags, describe_state_dict_mismatch
from megatron.checkpoint.rng import get_rng_state_with_tracker, set_rng_state_with_tracker
from megatron.core import parallel_state as ps
from megatron.core.errors import UserError

Report = Callable[[str], None]


def _compact(t: torch.Tensor) -> torch.Tensor:
    """A parameter that is a view into the distributed optimizer's flat buffer, copied out: torch.save would
    otherwise write the whole buffer for it."""
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        return t.detach().clone()
    return t


def common_state(args: Mapping, config: dict, scheduler: dict, train_state: dict, kept_length: int) -> dict:
    """The plain values every rank shares (see the module docstring); `kept_length` is r of the last iteration."""
    return {
        "args": dict(args),
        "config": config,
        "opt_param_scheduler": scheduler,
        "train_state": train_state,
        "consumed_train_samples": train_state["consumed_train_samples"],
        "consumed_valid_samples": train_state["consumed_valid_samples"],
        "random_ltd": {"consumed_layer_tokens": train_state["consumed_layer_tokens"], "current_value": kept_length},
    }


def training_state(common: dict, model: torch.nn.Module, optimizer) -> dict:
    """This rank's legacy checkpoint contents: `common_state` with the model, optimizer and RNG states."""
    return {**common, "model": {k: _compact(v) for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(), "rng_state": get_rng_state_with_tracker()}


def dist_common_state(common: dict, optimizer) -> dict:
    """`common_state` plus what torch_dist keeps in JSON: the optimizer's plain values and this layout."""
    scaler = None if optimizer.scaler is None else optimizer.scaler.state_dict()
    layout = {"tensor_model_parallel_size": ps.get_tensor_model_parallel_world_size(),
              "pipeline_model_parallel_size": ps.get_pipeline_model_parallel_world_size(),
              "data_parallel_size": ps.get_data_parallel_world_size()}
    return {**common, "optimizer": {"distributed": optimizer.distributed, "grad_scaler": scaler}, "layout": layout}


def checkpoint_group():
    """A gloo group over every rank for checkpoints: DCP exchanges its plans on it and an asynchronous save
    agrees on it from its own thread, never interleaving with training's collectives (a collective call;
    None in one process)."""
    return dist.new_group(backend="gloo") if dist.is_initialized() else None


def _rank_file():
    """(tp rank, pp rank or None): Megatron names the rank folder without the stage when PP = 1."""
    pp = ps.get_pipeline_model_parallel_world_size()
    return ps.get_tensor_model_parallel_rank(), (ps.get_pipeline_model_parallel_rank() if pp > 1 else None)


def distrib_optim_files(optimizer) -> dict:
    """{"distrib_optim.pt": the gathered optimizer shards} on the writer, {} elsewhere or when the optimizer
    is not distributed. Every data-parallel rank must call it (the gather is collective)."""
    if not optimizer.distributed:
        return {}
    state = optimizer.gather_state()
    return {} if state is None else {DISTRIB_OPTIM: state}


def save_torch_dist(root: str, iteration: int, common: dict, model: torch.nn.Module, optimizer, group,
                    async_save: bool, report: Report):
    """Every rank calls it; returns torch_dist.PendingSave for an asynchronous save, else None."""
    return torch_dist.save(root, iteration, dist_common_state(common, optimizer), model, optimizer,
                           tp_rank=ps.get_tensor_model_parallel_rank(), tp=ps.get_tensor_model_parallel_world_size(),
                           pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
                           group=group, async_save=async_save, report=report)


def save(root: str, iteration: int, state: dict, writer: bool, report: Report,
         extra_files: Optional[dict] = None) -> None:
    """Every rank calls it; `writer` ranks (DP rank 0 of each model-parallel rank) write their files."""
    t0 = time.perf_counter()
    report(f"saving checkpoint at iteration {iteration:7d} to {root} in torch format")
    protocol.save_checkpoint(root, iteration, state, *_rank_file(), writer=writer, report=report,
                             extra_files=extra_files)
    report(f"  successfully saved checkpoint at iteration {iteration:7d} to {root} "
           f"[ t {time.perf_counter() - t0:.2f}s ]")


def _check_layout(root: str, iteration: int) -> None:
    if torch_dist.is_torch_dist(protocol.committed_dir(root, iteration)):
        return  # any layout loads it
    saved = protocol.saved_layout(root, iteration)
    here = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    if saved is not None and saved != here:
        raise UserError(f"checkpoint iteration {iteration} in {root} was saved with tensor x pipeline "
                        f"parallel {saved[0]} x {saved[1]}, this run uses {here[0]} x {here[1]}; convert it "
                        "with tools/checkpoint_util.py or launch the same layout")


def _read(root: str, iteration: int) -> dict:
    """What resuming reads first, either format: common.json (checked against its shards) or this rank's file."""
    folder = protocol.committed_dir(root, iteration)
    if torch_dist.is_torch_dist(folder):
        return torch_dist.read_common(folder)
    return protocol.load_checkpoint(root, iteration, *_rank_file())


def load(root: str, args: Mapping, model: torch.nn.Module, optimizer, *, fallback: bool, finetune: bool,
         load_optim: bool, load_rng: bool, report: Report, group=None) -> Optional[dict]:
    """Load the checkpoint to resume from into `model` (and, unless `finetune`, the optimizer and RNG
    states); returns its plain values (the legacy dict, or torch_dist's common.json), or None when `root`
    holds none. Either format, whatever `--ckpt-format` this run saves in; `group` is the gloo group DCP
    plans a torch_dist load on.

    `args` are this run's (Megatron names), compared with the checkpoint's model flags."""
    for name in protocol.incomplete_saves(root):
        report(f"WARNING: ignoring {root}/{name}: a save that was interrupted (never loaded; the next save into "
               "this folder removes it)")
    chosen = protocol.select_checkpoint(root, *_rank_file(), fallback, before_load=lambda it: _check_layout(root, it),
                                        report=report, read=lambda it: _read(root, it))
    if chosen is None:
        report(f"WARNING: no checkpoint found at {root}; training from scratch")
        return None
    iteration, ckpt = chosen
    where = f"checkpoint iteration {iteration} in {root}"
    if IMPORTED in ckpt and not finetune and (load_optim or load_rng):
        raise UserError(f"{where} was written by {ckpt[IMPORTED]['source']}: only its weights are read (not its "
                        "optimizer or RNG states); add --finetune, or --no-load-optim --no-load-rng to continue "
                        "its iteration count")
    if ckpt.get("format") == torch_dist.FORMAT:
        check_model_flags(torch_dist.comparable_args(ckpt.get("args") or {}), args, where)
        torch_dist.load_into(ckpt, model, optimizer, tp_rank=ps.get_tensor_model_parallel_rank(),
                             tp=ps.get_tensor_model_parallel_world_size(), pp_rank=ps.get_pipeline_model_parallel_rank(),
                             pp=ps.get_pipeline_model_parallel_world_size(), group=group,
                             load_optim=load_optim and not finetune, load_rng=load_rng and not finetune, where=where,
                             report=report)
        if finetune:
            report(f" loaded weights from {root} at iteration {iteration} (finetune: iteration, optimizer and "
                   "counters reset)")
        return ckpt
    check_model_flags(ckpt.get("args") or {}, args, where)
    if not isinstance(ckpt.get("model"), dict):
        raise UserError(f"{where} holds no model state dict")
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:  # flags the checkpoint does not record (older checkpoints), or a foreign one
        detail = describe_state_dict_mismatch(model.state_dict(), ckpt["model"])
        raise UserError(f"{where} does not fit this model: {detail or ' '.join(str(e).split())[:300]}") from None
    if finetune or not load_optim:
        optimizer.reload_model_params()  # else the first step writes the initial main params back
    if finetune:
        report(f" loaded weights from {root} at iteration {iteration} (finetune: iteration, optimizer and "
               "counters reset)")
        return ckpt
    if load_optim:
        if "optimizer" not in ckpt:
            raise UserError(f"checkpoint in {root} has no optimizer state (a converted checkpoint?); "
                            "add --no-load-optim --no-load-rng, or --finetune")
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except UserError as e:
            raise UserError(f"{where}: {e}") from None
        if optimizer.distributed:
            path = os.path.join(os.path.dirname(protocol.committed_file(root, iteration, *_rank_file())),
                                DISTRIB_OPTIM)
            if not os.path.isfile(path):
                raise UserError(f"{where} has no {DISTRIB_OPTIM} beside {os.path.basename(path)}; it is "
                                "incomplete, or add --no-load-optim")
            optimizer.load_gathered_state(protocol.torch_load(path), where)
    if load_rng:
        if "rng_state" not in ckpt:
            raise UserError(f"checkpoint in {root} has no RNG state; add --no-load-rng")
        set_rng_state_with_tracker(ckpt["rng_state"])
    return ckpt
