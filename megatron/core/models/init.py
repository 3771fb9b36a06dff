"""Parameter initialization that does not depend on the parallel layout.

Every parameter is drawn as its *full* tensor from a generator keyed by (seed, global parameter name),
then this rank keeps its tensor-parallel shard. So a model split over any TP x PP layout starts from
exactly the weights of the single-process model with the same seed: the equivalence tests rely on it,
and so do users who change layout between runs. The global name numbers layers over the whole model
(`decoder.layers.17.…` on whichever pipeline stage holds layer 17).

Megatron's recipe: weights N(0, std); output projections (attention `linear_proj`, MLP `linear_fc2`)
N(0, std / sqrt(2L)); biases zero; norm weights one.
"""

import hashlib
import math

import torch
from torch import nn

from megatron.core import parallel_state
from megatron.core.tensor_parallel import full_shape, shard_tensor


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def full_init(name: str, shape, std: float, num_layers: int, seed: int) -> torch.Tensor:
    """The full-size initial value of the parameter with this global name."""
    if len(shape) == 1:
        # norm weights (`input_layernorm`, BERT's `lm_head.layer_norm`) start at one, biases at zero
        return torch.ones(shape) if name.endswith(("layernorm.weight", "layer_norm.weight")) else torch.zeros(shape)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / math.sqrt(2.0 * num_layers)
    return torch.empty(shape).normal_(0.0, std, generator=_generator(seed, name))


@torch.no_grad()
def init_parameters(model: nn.Module, global_name, std: float, num_layers: int, seed: int) -> None:
    """Initialize `model`'s local parameters; `global_name(local_name)` maps to the layout-free key.
    Parameters on the meta device (a model built for its shapes only) are left undrawn."""
    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    for name, p in model.named_parameters():
        if p.is_meta:
            continue
        split = getattr(p, "tensor_model_parallel", False) and tp > 1
        shape = full_shape(p, tp) if split else tuple(p.shape)
        full = full_init(global_name(name), shape, std, num_layers, seed)
        local = shard_tensor(full, p.partition_dim, p.partition_stride, rank, tp) if split else full
        p.copy_(local.to(p.device, p.dtype))
