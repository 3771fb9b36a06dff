"""Megatron's `pretrain()`: join the process group, build the model and data, train.

    pretrain(config, model_provider, datasets_provider, forward_step)

The entry points (pretrain_gpt_ltd.py, pretrain_bert_ltd.py) resolve the flags into a `RunConfig` and say
how to build their model and datasets; everything from the process group on is here, and the loop is
`trainer.Trainer`.
"""

import random
from typing import Callable

import numpy as np
import torch.distributed as dist

from megatron.checkpoint.protocol import check_save_dir
from megatron.core import parallel_state as ps
from megatron.core.errors import UserError
from megatron.core.pipeline_parallel import ForwardStep
from megatron.core.tensor_parallel import model_parallel_manual_seed
from megatron.training.arguments import print_args
from megatron.training.config import RunConfig
from megatron.training.logging import print_rank_0
from megatron.training.signals import Deadline, SignalRecorder
from megatron.training.state import TrainState
from megatron.training.trainer import Trainer


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    model_parallel_manual_seed(seed)  # torch default generator (+100 * pp rank) and the TP-rank tracker


def pretrain(config: RunConfig, model_provider: Callable, datasets_provider: Callable,
             forward_step: ForwardStep) -> TrainState:
    """Megatron's pretrain(): join the process group, seed, build model and data, train, evaluate, save.

    `model_provider(pre_process, post_process, layer_offset, num_local_layers)` builds this pipeline stage;
    `datasets_provider((train, valid, test) sample counts)` the datasets.
    """
    deadline = Deadline(config.training.exit_duration_in_mins)
    ps.init_distributed(config.parallel.distributed_backend)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world != config.parallel.world_size:
        raise UserError(f"the process group has {world} ranks, but the configuration was resolved for "
                        f"{config.parallel.world_size} (WORLD_SIZE); launch with torchrun or set WORLD_SIZE")
    check_save_dir(config.checkpoint.save)
    signals = SignalRecorder().install() if config.training.exit_signal_handler else None
    try:
        return _pretrain(config, model_provider, datasets_provider, forward_step, signals, deadline)
    finally:
        if signals is not None:
            signals.restore()


def _pretrain(config: RunConfig, model_provider, datasets_provider, forward_step, signals, deadline) -> TrainState:
    p = config.parallel
    ps.initialize_model_parallel(p.tensor_model_parallel_size, p.pipeline_model_parallel_size)
    if not dist.is_initialized() or dist.get_rank() == 0:
        print_args(config.args)
    set_seed(config.training.seed)
    per_stage = config.model.num_layers // p.pipeline_model_parallel_size
    stage = ps.get_pipeline_model_parallel_rank()
    model = model_provider(ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage(), stage * per_stage, per_stage)
    n_params = sum(x.numel() for x in model.parameters())
    print_rank_0(f" > number of parameters on (tensor, pipeline) model parallel rank "
                 f"({ps.get_tensor_model_parallel_rank()}, {stage}): {n_params}")
    datasets = datasets_provider(config.run.num_samples(config.logging.eval_interval, config.logging.eval_iters))
    if signals is not None and not config.checkpoint.save:
        print_rank_0("WARNING: --exit-signal-handler without --save: a signal stops the run cleanly, but "
                     "nothing is saved")
    return Trainer(config, model, datasets, forward_step, signals, deadline).train()
