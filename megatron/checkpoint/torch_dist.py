"""`--ckpt-format torch_dist`: every rank writes its own pieces in parallel through PyTorch's distributed
checkpoint (DCP), optionally while training goes on, and any layout resumes from it, optimizer included.

    <save>/latest_checkpointed_iteration.txt      the tracker, as in the `torch` format
    <save>/iter_0000100/                          .metadata, __<rank>_0.distcp, common.json, metadata.json,
                                                  rng/mp_rank_XX_YYY.json (names: naming.py)

What goes where:
  - tensors (weights, fp32 main parameters, Adam moments) as pieces of layout-free global tensors
    (dcp_state.py, dcp_optimizer.py), written by DCP: each rank one file, replicas written once, spread
    over the ranks that hold them;
  - plain values in JSON, never pickled: `common.json` (rank 0: args, config, iteration, counters, LR
    schedule, random-LTD state, grad scaler, AdamW step, the saving layout) and one RNG file per
    (TP rank, stage), from its DP rank 0. RNG states are restored only in the layout that saved them, as
    Megatron does; the token-dropping draw uses no RNG, so a new layout drops the same tokens.

Saving keeps the crash-safe protocol of protocol.py: everything goes into `iter_X.tmp/` (DCP fsyncs each
file and writes `.metadata` last through a renamed temporary file), all ranks agree that every write
succeeded, rank 0 fsyncs the folder, renames it to `iter_X` and replaces the tracker last. A process
killed at any moment leaves the previous checkpoint and the tracker valid.

`--async-save`: the pieces are copied to host memory first (the "staging", the only part training
waits for), then a background thread on each rank runs DCP's write and the commit, on a gloo group of
its own so that its collectives never interleave with training's. The next save, the end of training
and an early exit wait for it; the tracker names the new iteration only once every rank's files are
durable. At most one save is in flight.
"""

import os
import threading
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist

from megatron.checkpoint import protocol
from megatron.checkpoint.dcp_io import METADATA, check_files, read_dcp, read_metadata, write_dcp
from megatron.checkpoint.dcp_optimizer import adam_step, apply_loaded, optimizer_pieces, optimizer_targets
from megatron.checkpoint.dcp_state import FP32_PARAM, MODEL, MOMENTS, model_pieces, model_targets, moment_prefix, \
    saved_shapes, shape_problems
from megatron.checkpoint.naming import COMMON_JSON, FORMAT_JSON, RNG_DIR, rng_file_relpath
from megatron.checkpoint.rng import get_rng_state_with_tracker, set_rng_state_with_tracker
from megatron.checkpoint.rng_json import rng_from_json, rng_to_json
from megatron.core.errors import UserError

Report = Callable[[str], None]
FORMAT = "torch_dist"
FORMAT_MARKER = {"sharded_backend": FORMAT, "sharded_backend_version": 1, "common_backend": "json"}


def is_torch_dist(folder: str) -> bool:
    """A torch_dist iteration folder (DCP's `.metadata` or our common.json), not mp_rank_* files."""
    return os.path.isfile(os.path.join(folder, METADATA)) or os.path.isfile(os.path.join(folder, COMMON_JSON))


# ---- saving ---------------------------------------------------------------------------------------------
class PendingSave:
    """An asynchronous save in flight: `wait()` returns once it is committed, or raises its error."""

    def __init__(self, iteration: int, root: str, run: Callable[[], None], report: Report):
        self.iteration, self.root, self.report = iteration, root, report
        self.error: Optional[BaseException] = None
        self.started = time.perf_counter()
        self._thread = threading.Thread(target=self._run, args=(run,), name=f"save-iter-{iteration}", daemon=True)
        self._thread.start()

    def _run(self, run) -> None:
        try:
            run()
        except BaseException as e:  # noqa: BLE001 - re-raised by wait() on the training thread
            self.error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error
        self.report(f"  successfully saved checkpoint at iteration {self.iteration:7d} to {self.root} "
                    f"(asynchronously, written in the background for {time.perf_counter() - self.started:.2f}s)")


def save(root: str, iteration: int, common: dict, model: torch.nn.Module, optimizer, *, tp_rank: int, tp: int,
         pp_rank: int, dp_rank: int, group, async_save: bool, report: Report) -> Optional[PendingSave]:
    """Every rank calls it. Synchronous: returns once the checkpoint is committed. Asynchronous: returns
    the PendingSave once the pieces are staged in host memory."""
    t0 = time.perf_counter()
    report(f"saving checkpoint at iteration {iteration:7d} to {root} in {FORMAT} format"
           f"{' (asynchronously)' if async_save else ''}")
    error = protocol.begin_save(root, report, group)
    state = {**model_pieces(model, tp_rank, tp, copy=async_save),
             **optimizer_pieces(optimizer, model, tp_rank, tp, copy=async_save)}  # collective over DP
    common = {**common, "format": FORMAT, "iteration": iteration, "checkpoint_version": protocol.CHECKPOINT_VERSION,
              "optimizer": {**common.get("optimizer", {}), "step": adam_step(optimizer)}}
    rng = rng_to_json(get_rng_state_with_tracker()) if dp_rank == 0 else None
    rank0 = not dist.is_initialized() or dist.get_rank() == 0

    def write(tmp: str) -> None:
        if rank0:
            _write_common(tmp, common)
        if rng is not None:
            os.makedirs(os.path.join(tmp, RNG_DIR), exist_ok=True)
            protocol.write_json_durably(rng, os.path.join(tmp, rng_file_relpath(tp_rank, pp_rank)))
        write_dcp(state, tmp, group)

    def finish() -> None:
        protocol.finish_save(root, iteration, write, error, group)

    if not async_save:
        finish()
        report(f"  successfully saved checkpoint at iteration {iteration:7d} to {root} "
               f"[ t {time.perf_counter() - t0:.2f}s ]")
        return None
    pending = PendingSave(iteration, root, finish, report)
    report(f"  staged checkpoint at iteration {iteration:7d} in host memory; training continues while it is "
           f"written [ t {time.perf_counter() - t0:.2f}s ]")
    return pending


def _write_common(tmp: str, common: dict) -> None:
    """Rank 0's JSON files: the common state and Megatron's format marker."""
    protocol.write_json_durably(common, os.path.join(tmp, COMMON_JSON))
    protocol.write_json_durably(FORMAT_MARKER, os.path.join(tmp, FORMAT_JSON))


# ---- loading --------------------------------------------------------------------------------------------
def read_common(folder: str) -> dict:
    """common.json of a torch_dist folder, checked against its DCP metadata and shard files: what the
    resume logic loads first (a damaged folder is one UserError, so --load-fallback can pass it over)."""
    import json

    path = os.path.join(folder, COMMON_JSON)
    if not os.path.isfile(path):
        from megatron.checkpoint.megatron_lm import other_format_hint

        hint = other_format_hint(folder)  # Megatron-LM's own torch_dist: common.pt, not our common.json
        if hint:
            raise UserError(f"{folder} is not a megatron-ltd checkpoint{hint}")
        raise UserError(f"{path} is missing: the {FORMAT} checkpoint in {folder} is incomplete")
    try:
        with open(path) as f:
            common = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); the file is damaged") from None
    if not isinstance(common, dict) or common.get("format") != FORMAT:
        raise UserError(f"{path} is not the common state of a {FORMAT} checkpoint")
    metadata = read_metadata(folder)
    check_files(folder, metadata)
    return {**common, "_metadata": metadata, "_folder": folder}


def comparable_args(saved: dict) -> dict:
    """The saved args to compare with this run's model flags: the padded vocabulary depends on TP and
    loads across paddings here, so it is left out (the tokenizer's size is compared)."""
    return {k: v for k, v in saved.items() if k != "padded_vocab_size"}


def load_into(ckpt: dict, model: torch.nn.Module, optimizer, *, tp_rank: int, tp: int, pp_rank: int, pp: int,
              group, load_optim: bool, load_rng: bool, where: str, report: Report) -> None:
    """Fill this rank's model (and optimizer, RNG) from a checkpoint `read_common` returned."""
    metadata, folder = ckpt["_metadata"], ckpt["_folder"]
    saved = saved_shapes(metadata)
    state = model_targets(model, tp_rank, tp, saved)
    problems = shape_problems(state, saved)
    if problems:
        raise UserError(f"{where} does not fit this model: {'; '.join(problems)}")
    step = int((ckpt.get("optimizer") or {}).get("step", 0))
    if load_optim:
        targets, loading = optimizer_targets(optimizer, model, tp_rank, tp, saved, step)
        state.update(targets)
        problems = shape_problems({k: v for k, v in state.items() if not k.startswith("model.")}, saved)
        if problems:
            raise UserError(f"{where} lacks optimizer state ({'; '.join(problems)}); add --no-load-optim")
    read_dcp(state, folder, metadata, group)
    if load_optim:
        apply_loaded(optimizer, loading, step)
        scaler = (ckpt.get("optimizer") or {}).get("grad_scaler")
        if optimizer.scaler is not None and scaler is not None:
            optimizer.scaler.load_state_dict(scaler)
    else:
        optimizer.reload_model_params()
    if load_rng:
        layout = ckpt.get("layout") or {}
        if (layout.get("tensor_model_parallel_size"), layout.get("pipeline_model_parallel_size")) != (tp, pp):
            report(f"WARNING: {where} was saved with tensor x pipeline parallel "
                   f"{layout.get('tensor_model_parallel_size')} x {layout.get('pipeline_model_parallel_size')}, "
                   f"this run uses {tp} x {pp}: its RNG states are not restored (dropout streams restart; the "
                   "dropped tokens do not depend on them)")
            return
        path = os.path.join(folder, rng_file_relpath(tp_rank, pp_rank))
        if not os.path.isfile(path):
            raise UserError(f"{where} has no RNG state {path}; add --no-load-rng")
        set_rng_state_with_tracker(rng_from_json(path))


# ---- one process: the tools (evaluation, export, conversion) -------------------------------------------------
def load_unsharded(folder: str, optimizer: bool = False) -> dict:
    """The checkpoint as one unsharded dict, as `convert.merge_checkpoint` gives a legacy one: `model` (the
    TP=1 PP=1 state dict), `args` (layout 1 x 1), the counters, and with `optimizer` the per-parameter
    state under convert.OPTIM_KEY ({"param"|"exp_avg"|"exp_avg_sq": {key: fp32}, "step"}) when it has it."""
    from megatron.checkpoint.convert import KEPT_KEYS, OPTIM_KEY  # convert imports this module

    common = read_common(folder)
    metadata = common["_metadata"]
    tensors = metadata.state_dict_metadata
    wanted = [k for k in tensors if k.startswith(MODEL)]
    step = int((common.get("optimizer") or {}).get("step", 0))
    if optimizer:
        wanted += [k for k in tensors if k.startswith(FP32_PARAM)]
        wanted += [k for k in tensors for q in MOMENTS if k.startswith(moment_prefix(q))] if step > 0 else []
    state = {k: torch.empty(tensors[k].size, dtype=tensors[k].properties.dtype) for k in wanted}
    read_dcp(state, folder, metadata, no_dist=True)
    model = {k[len(MODEL):]: v for k, v in state.items() if k.startswith(MODEL)}
    args = {**(common.get("args") or {}), "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}
    out = {k: common[k] for k in KEPT_KEYS if k in common}
    out.update(args=args, model=model)
    if optimizer and step > 0:
        params = {k[len(FP32_PARAM):]: v for k, v in state.items() if k.startswith(FP32_PARAM)}
        optim = {"param": {k: params.get(k, v.float()) for k, v in model.items()}, "step": step}
        for q in MOMENTS:
            optim[q] = {k[len(moment_prefix(q)):]: v for k, v in state.items() if k.startswith(moment_prefix(q))}
        if all(set(optim[q]) == set(model) for q in MOMENTS):
            out[OPTIM_KEY] = optim
            out["optimizer"] = {"distributed": True, "grad_scaler": (common.get("optimizer") or {}).get("grad_scaler")}
    return out


def save_unsharded(root: str, iteration: int, ckpt: dict, report: Report = print) -> None:
    """Write an unsharded checkpoint dict (`load_unsharded`'s form, or a merged legacy one) as torch_dist in
    one process, with the crash-safe protocol; any layout resumes it (RNG states restart)."""
    from megatron.checkpoint.convert import KEPT_KEYS, OPTIM_KEY  # convert imports this module

    state = {MODEL + k: v for k, v in ckpt["model"].items()}
    optim = ckpt.get(OPTIM_KEY)
    step = 0
    if optim is not None:
        step = int(optim.get("step", 0))
        state.update({FP32_PARAM + k: v for k, v in optim["param"].items()})
        if step > 0:
            state.update({moment_prefix(q) + k: v for q in MOMENTS for k, v in optim[q].items()})
    scaler = (ckpt.get("optimizer") or {}).get("grad_scaler")
    common = {k: ckpt[k] for k in KEPT_KEYS if k in ckpt and k != "model"}
    common.update(format=FORMAT, iteration=iteration, checkpoint_version=protocol.CHECKPOINT_VERSION, layout={},
                  optimizer={"distributed": optim is not None, "grad_scaler": scaler, "step": step})

    def write(tmp: str) -> None:
        _write_common(tmp, common)
        write_dcp(state, tmp, no_dist=True)

    protocol.finish_save(root, iteration, write, protocol.begin_save(root, report))
