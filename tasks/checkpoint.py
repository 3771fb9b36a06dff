"""A pretrained BERT from its checkpoint folder, whatever tensor/pipeline-parallel layout trained it.

    bert = load_pretrained_bert("runs/bert/checkpoints")   # latest iteration, or ".../iter_0000100"
    bert.args, bert.state, bert.iteration, bert.root

`state` is the single-process model's state dict (global layer numbers, whole tensors), as
`megatron.checkpoint.reader` returns it for any layout (shards joined along the dimension each parameter
of the model is tagged with). It is loaded into a single-process `BertModel` built from the saved flags
strictly, so a missing or misshapen tensor is an error.
"""

from typing import NamedTuple

from megatron.checkpoint.model_args import build_model_from_args, transformer_config_from_args
from megatron.checkpoint.reader import load_unsharded_checkpoint
from megatron.core.errors import UserError
from megatron.core.transformer.config import TransformerConfig


def bert_config(args: dict, hidden_dropout: float = 0.0, attention_dropout: float = 0.0) -> TransformerConfig:
    """The encoder's TransformerConfig from a checkpoint's saved flags."""
    return transformer_config_from_args(args, causal=False, hidden_dropout=hidden_dropout,
                                        attention_dropout=attention_dropout)


class PretrainedBert(NamedTuple):
    args: dict  # the flags saved by pretrain_bert_ltd.py
    state: dict  # the single-process BertModel's state dict
    iteration: int
    root: str  # the checkpoint folder (holding latest_checkpointed_iteration.txt)


def load_pretrained_bert(load: str) -> PretrainedBert:
    """The BERT checkpoint at `load`, merged into one process's model."""
    root, iteration, args, state = load_unsharded_checkpoint(load)
    if args.get("model_type") != "bert":
        raise UserError(f"{root} iteration {iteration} is not a BERT checkpoint (written by pretrain_bert_ltd.py); "
                        "pass --pretrained-checkpoint of a BERT run")
    template = build_model_from_args(args, hidden_dropout=0.0, attention_dropout=0.0)
    if not template.config.untie_embeddings_and_output_weights:
        state.pop("output_layer.weight", None)  # the last pipeline stage's copy of the word embeddings
    try:
        template.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{root} iteration {iteration} does not fit its own flags: {str(e).splitlines()[-1][:200]}")
    return PretrainedBert(args, {k: v.detach().clone() for k, v in template.state_dict().items()}, iteration, root)
