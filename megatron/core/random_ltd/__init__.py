"""Random-LTD: random and layerwise token dropping (Yao et al. 2022), in one package.

In training, each layer of the LTD set runs on r_t of the s tokens of every sample (a uniform random
subset, kept in order, drawn independently per sample and per layer); the other tokens bypass the layer
unchanged. r_t grows from r_0 to s (MSLG). Activations are batch-first `[b, s, h]`.

- config.py      flags as a dataclass, the layer set (`--random-ltd-layers 1-22`), validation
- schedule.py    MSLG: r_t for iteration t, exact integer arithmetic
- sampler.py     kept indices as a pure function of (seed, iteration, sample, layer): layout-invariant;
                 a torch draw and its bit-identical numpy twin
- routing.py     gather -> run layer -> scatter, an autograd pair saving only the row numbers; what the
                 transformer block calls
- sequence_parallel.py  the same under sequence parallelism: kept tokens to their kept-list owners
- plan.py        per iteration: every micro-batch's indices drawn on the host ahead of the step (keyed by
                 global sample ids and r_t), int32 on the device
- accounting.py  layer-tokens per iteration and over a run, theoretical saving, training-length plans

Glossary: b micro batch, G global batch, s sequence, r kept tokens, h hidden, L layers, n LTD layers,
q seq step, T_r ramp iterations, t 0-based iteration (completed optimizer steps).
"""

from megatron.core.random_ltd.accounting import (
    LayerTokenCurve,
    TrainingPlan,
    layer_tokens_per_iteration,
    plan_training,
    theoretical_saving,
)
from megatron.core.random_ltd.config import (
    RandomLTDConfig,
    default_ltd_layers,
    parse_layer_spec,
    ramp_iters_from_fraction,
)
from megatron.core.random_ltd.plan import RandomLTDPlan
from megatron.core.random_ltd.routing import RandomLTDState, forward_layer, run_layer_on_kept
from megatron.core.random_ltd.sampler import kept_indices, kept_indices_for_layers
from megatron.core.random_ltd.schedule import MSLGSchedule

__all__ = [
    "LayerTokenCurve",
    "MSLGSchedule",
    "RandomLTDConfig",
    "RandomLTDPlan",
    "RandomLTDState",
    "TrainingPlan",
    "default_ltd_layers",
    "forward_layer",
    "kept_indices",
    "kept_indices_for_layers",
    "layer_tokens_per_iteration",
    "parse_layer_spec",
    "plan_training",
    "ramp_iters_from_fraction",
    "run_layer_on_kept",
    "theoretical_saving",
]
