#!/usr/bin/env python
"""Pretrain BERT with random-LTD: parse Megatron's flags, build model and data, train.

    python pretrain_bert_ltd.py --num-layers 24 --hidden-size 1024 --num-attention-heads 16 \
        --seq-length 512 --micro-batch-size 16 --global-batch-size 1024 --train-iters 2000000 \
        --lr 1e-4 --min-lr 1e-5 --lr-decay-style linear --lr-warmup-iters 10000 \
        --tokenizer-type BertWordPieceLowerCase --vocab-file vocab.txt \
        --data-path my-corpus_text_sentence --random-ltd --random-ltd-start-seq-length 128 ...

The loss is the masked-LM loss plus, unless `--bert-no-binary-head`, the sentence-order-prediction loss;
the log line reports `lm loss`, `sop loss`, `mlm accuracy` and `sop accuracy`.
examples/pretrain_bert_large_ltd.sh is the paper's BERT-large recipe; docs/bert.md the guide.
"""

import sys

import torch
import torch.nn.functional as F

from megatron.core.datasets.bert_dataset import BertDatasetConfig, build_bert_datasets
from megatron.core.models.bert import BertModel, BertOutput
from megatron.core.tokenizer import build_tokenizer, tokenizer_config_from_args
from megatron.training.bert_arguments import BertConfig, bert_config, parse_bert_args
from megatron.training.cli import run_cli
from megatron.training.config import RunConfig, resolve_config
from megatron.training.pretrain import pretrain


def forward_step(data_iterator, model):
    """One micro-batch through this pipeline stage; on the last stage, the loss function for its output."""
    batch = next(data_iterator)
    assert batch["padding_mask"].dtype == torch.bool, "the dataset's padding_mask: bool [b, s], True = PAD"
    output = model(batch["text"], batch["types"], batch["padding_mask"], labels=batch["labels"], ltd=batch["ltd"])

    def loss_fn(out: BertOutput):
        mask = batch["loss_mask"].float()  # [b, s], 1 on the masked (predicted) tokens
        n = mask.sum().clamp(min=1.0)
        lm_loss = (out.lm_loss * mask).sum() / n
        metrics = {"lm loss": lm_loss.detach()}
        loss = lm_loss
        if out.binary_logits is not None:
            sop_loss = F.cross_entropy(out.binary_logits.float(), batch["is_random"])  # [b, 2] vs [b]
            loss = loss + sop_loss
            metrics["sop loss"] = sop_loss.detach()
        # Accuracies as (correct, counted) pairs: the trainer sums both over micro-batches and data-parallel
        # ranks before dividing, so every predicted token weighs the same.
        metrics["mlm accuracy"] = ((out.mlm_correct.float() * mask).sum().detach(), mask.sum())
        if out.binary_logits is not None:
            sop_correct = (out.binary_logits.argmax(-1) == batch["is_random"]).float()  # [b]
            metrics["sop accuracy"] = (sop_correct.sum(), sop_correct.new_full((), sop_correct.numel()))  # no host copy
        return loss, metrics

    return output, loss_fn


def build_datasets(config: RunConfig, bert: BertConfig, tokenizer, num_samples):
    """Train/valid/test BERT datasets (sentence-split `--data-path`), each sample a dict of numpy arrays:
    text, types, labels (-1 where not masked), loss_mask, padding_mask (True = PAD), is_random."""
    for name in ("cls", "sep", "mask"):  # before any index is built: a tokenizer without them raises a UserError
        getattr(tokenizer, name)
    data = config.data
    dataset_config = BertDatasetConfig(
        seq_length=config.model.seq_length, seed=config.training.seed, data_path=list(data.data_path),
        split=data.split, data_cache_path=data.data_cache_path, masked_lm_prob=bert.mask_prob,
        short_seq_prob=bert.short_seq_prob, max_ngram=bert.masking_max_ngram,
        whole_word_masking=bert.whole_word_masking, binary_head=bert.binary_head, tokenizer=tokenizer,
        tokenizer_description=f"{config.tokenizer.tokenizer_type}:{config.tokenizer.vocab_file}:{tokenizer.vocab_size}",
    )
    return build_bert_datasets(dataset_config, num_samples)


def main(argv=None):
    flags = parse_bert_args(argv)
    bert = bert_config(flags)
    tokenizer = build_tokenizer(tokenizer_config_from_args(flags))
    config = resolve_config(flags, tokenizer.vocab_size, model_type="bert")  # "bert": fine-tuning checks it

    def model_provider(pre_process, post_process, layer_offset, num_local_layers):
        return BertModel(config.model, pre_process, post_process, layer_offset, num_local_layers,
                         seed=config.training.seed, add_binary_head=bert.binary_head)

    def datasets_provider(num_samples):
        return build_datasets(config, bert, tokenizer, num_samples)

    pretrain(config, model_provider, datasets_provider, forward_step)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
