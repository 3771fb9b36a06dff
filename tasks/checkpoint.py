"""A pretrained BERT from its checkpoint folder, whatever tensor/pipeline-parallel layout trained it.

    bert = load_pretrained_bert("runs/bert/checkpoints")   # latest iteration, or ".../iter_0000100"
    bert.args, bert.state, bert.iteration, bert.root

`state` is the single-process model's state dict (global layer numbers, whole tensors). Shards are joined
along the dimension the model itself tags on each parameter (`partition_dim`, `partition_stride`), read
from a single-process `BertModel` built from the saved flags, so nothing here lists parameter names; a
stage's local layer numbers are shifted by its first layer; the last stage's copy of the tied embeddings
is dropped. The result is loaded into that model strictly, so a missing or misshapen tensor is an error.
"""

import dataclasses
import re
from typing import NamedTuple

from megatron.core.errors import UserError
from megatron.core.models.bert import BertModel
from megatron.core.tensor_parallel import merge_shards
from megatron.core.transformer.config import TransformerConfig
from megatron.evaluation.checkpoint_model import config_from_args, resolve_checkpoint
from megatron.training.checkpoint_layout import read_checkpoint

_LAYER = re.compile(r"^encoder\.layers\.(\d+)\.")


def bert_config(args: dict, hidden_dropout: float = 0.0, attention_dropout: float = 0.0) -> TransformerConfig:
    """The encoder's TransformerConfig from a checkpoint's saved flags."""
    return dataclasses.replace(config_from_args(args), causal=False, hidden_dropout=hidden_dropout,
                               attention_dropout=attention_dropout)


class PretrainedBert(NamedTuple):
    args: dict  # the flags saved by pretrain_bert_ltd.py
    state: dict  # the single-process BertModel's state dict
    iteration: int
    root: str  # the checkpoint folder (holding latest_checkpointed_iteration.txt)


def load_pretrained_bert(load: str) -> PretrainedBert:
    """The BERT checkpoint at `load`, merged into one process's model."""
    root, iteration = resolve_checkpoint(load)
    sharded = read_checkpoint(root, iteration)
    args = dict(sharded.files[(0, 0)].get("args") or {})
    if args.get("model_type") != "bert":
        raise UserError(f"{root} iteration {iteration} is not a BERT checkpoint (written by pretrain_bert_ltd.py); "
                        "pass --pretrained-checkpoint of a BERT run")
    template = BertModel(bert_config(args), add_binary_head=args.get("bert_binary_head", True))
    params = dict(template.named_parameters())
    tp, pp = sharded.tp, sharded.pp
    per_stage = args["num_layers"] // pp
    tied = not args.get("untie_embeddings_and_output_weights", False)
    full = {}
    for stage in range(pp):
        shards = [sharded.files[(t, stage)]["model"] for t in range(tp)]
        for local in shards[0]:
            if local == "output_layer.weight" and tied:
                continue  # the last stage's copy of the word embeddings
            key = _LAYER.sub(lambda m: f"encoder.layers.{int(m.group(1)) + stage * per_stage}.", local)
            if key not in params:
                raise UserError(f"{root}: unexpected parameter {local!r} in stage {stage}; not a BERT of these flags")
            parts = [shard[local] for shard in shards]
            p = params[key]
            split = tp > 1 and getattr(p, "tensor_model_parallel", False)
            full[key] = merge_shards(parts, p.partition_dim, p.partition_stride) if split else parts[0]
    try:
        template.load_state_dict(full, strict=True)
    except RuntimeError as e:
        raise UserError(f"{root} iteration {iteration} does not fit its own flags: {str(e).splitlines()[-1][:200]}")
    return PretrainedBert(args, {k: v.detach().clone() for k, v in template.state_dict().items()}, iteration, root)
