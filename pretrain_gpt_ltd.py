#!/usr/bin/env python
"""Pretrain a GPT model with random-LTD: parse Megatron's flags, build model and data, train.

    python pretrain_gpt_ltd.py --num-layers 4 --hidden-size 256 --num-attention-heads 8 \
        --seq-length 256 --micro-batch-size 8 --global-batch-size 8 --train-iters 300 --lr 1e-3 \
        --tokenizer-type GPT2BPETokenizer --vocab-file vocab.json --merge-file merges.txt \
        --data-path my-corpus_text_document --random-ltd --random-ltd-start-seq-length 64 ...
"""

import sys

from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, build_gpt_datasets
from megatron.core.models.gpt import GPTModel
from megatron.core.tokenizer import build_tokenizer, tokenizer_config_from_args
from megatron.training.arguments import parse_args
from megatron.training.cli import run_cli
from megatron.training.config import resolve_config
from megatron.training.pretrain import pretrain


def forward_step(data_iterator, model):
    """One micro-batch through this pipeline stage; on the last stage, the loss function for its output
    (the `ForwardStep` contract of megatron/core/pipeline_parallel/schedules.py)."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], labels=batch["labels"], ltd=batch["ltd"])

    def loss_fn(loss):  # [b, s] per-token loss -> masked mean over this micro-batch
        mask = batch["loss_mask"].to(loss.dtype)  # [b, s]
        lm_loss = (loss * mask).sum() / mask.sum().clamp(min=1.0)
        return lm_loss, {"lm loss": lm_loss.detach()}

    return output, loss_fn


def main(argv=None):
    flags = parse_args(argv)
    tokenizer = build_tokenizer(tokenizer_config_from_args(flags))
    config = resolve_config(flags, tokenizer.vocab_size)
    seed, data = config.training.seed, config.data

    def model_provider(pre_process, post_process, layer_offset, num_local_layers):
        return GPTModel(config.model, pre_process, post_process, layer_offset, num_local_layers, seed=seed)

    def datasets_provider(num_samples):
        data_config = GPTDatasetConfig(
            seq_length=config.model.seq_length, seed=seed, data_path=list(data.data_path), split=data.split,
            data_cache_path=data.data_cache_path, mock=data.mock_data, eod_token=tokenizer.eod,
            vocab_size=tokenizer.vocab_size, reset_position_ids=data.reset_position_ids,
            eod_mask_loss=data.eod_mask_loss,
            tokenizer_description=f"{config.tokenizer.tokenizer_type}:{tokenizer.vocab_size}",
        )
        return build_gpt_datasets(data_config, num_samples)

    pretrain(config, model_provider, datasets_provider, forward_step)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
