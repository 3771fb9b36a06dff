"""BERT's flags, added to the shared parser by the BERT entry point (`pretrain_bert_ltd.py`).

Kept apart from `arguments.py` so GPT's `--help` stays GPT's. Names follow Megatron-LM where it has the
flag (`--bert-no-binary-head`, `--mask-prob`, `--short-seq-prob`); the two masking knobs Megatron only
has as dataset-config fields get flags here (`--masking-max-ngram`, `--no-whole-word-masking`).
"""

import argparse
import os
from dataclasses import dataclass
from typing import Optional

from megatron.core.errors import UserError
from megatron.core.random_ltd.config import parse_layer_spec
from megatron.training.arguments import build_parser, parse_args


@dataclass(frozen=True)
class BertConfig:
    """BERT's own settings (the rest of the run is the shared RunConfig)."""
    binary_head: bool  # the sentence-order prediction (SOP) head, pooler and token types
    mask_prob: float
    short_seq_prob: float
    masking_max_ngram: int
    whole_word_masking: bool


def add_bert_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g = parser.add_argument_group("BERT")
    g.add_argument("--bert-no-binary-head", action="store_false", dest="bert_binary_head",
                   help="no sentence-order prediction (SOP) head, pooler or token types; MLM loss only")
    g.add_argument("--mask-prob", type=float, default=0.15, help="fraction of tokens to predict (MLM)")
    g.add_argument("--short-seq-prob", type=float, default=0.1,
                   help="probability of a sample with a random shorter target length")
    g.add_argument("--masking-max-ngram", type=int, default=3, help="longest masked n-gram span")
    g.add_argument("--no-whole-word-masking", action="store_false", dest="whole_word_masking",
                   help="mask word pieces independently instead of whole words")
    return parser


def validate_bert_args(args: argparse.Namespace) -> None:
    """BERT's cross-flag rules (the value ranges are arguments.RANGES')."""
    if args.mock_data:
        raise UserError("--mock-data is GPT-only; BERT needs sentence-split data: pass --data-path PREFIX "
                        "(tools/preprocess_data.py --split-sentences)")
    if args.reset_position_ids or args.eod_mask_loss:
        raise UserError("--reset-position-ids and --eod-mask-loss are GPT-only flags; drop them for BERT")
    warning = edge_layer_warning(args)
    if warning and os.environ.get("RANK", "0") == "0":
        print(f"WARNING: {warning}", flush=True)


def edge_layer_warning(args: argparse.Namespace) -> Optional[str]:
    """The one-line warning for --random-ltd-layers naming the first or last layer, else None.

    Allowed, but rarely meant: random-LTD keeps both dense. A token dropped in the last layer reaches the
    heads with the previous layer's output, so the SOP head may read a [CLS] (and the MLM head masked
    tokens) that skipped the last layer; one dropped in the first layer enters layer 1 as a bare embedding.
    """
    if not args.random_ltd or not args.random_ltd_layers:
        return None
    first, last = 0, args.num_layers - 1
    edges = {first, last} & set(parse_layer_spec(args.random_ltd_layers, args.num_layers))
    if not edges:
        return None
    why = []
    if first in edges:
        why.append(f"a token dropped in layer {first} enters layer 1 as a bare embedding")
    if last in edges:
        heads = "the SOP head may read a [CLS], and the MLM head masked tokens," if args.bert_binary_head else \
            "the MLM head may read masked tokens"
        why.append(f"{heads} that skipped the last layer {last}")
    default = f"1-{last - 1}" if last > 2 else "1" if last == 2 else "none, the model is too shallow"
    return (f"--random-ltd-layers {args.random_ltd_layers} includes the first or last layer, which random-LTD "
            f"keeps dense: {'; '.join(why)} (the default is {default})")


def parse_bert_args(argv=None) -> argparse.Namespace:
    parser = add_bert_args(build_parser("Pretrain a BERT model with random-LTD"))
    args = parse_args(argv, parser)
    validate_bert_args(args)
    return args


def bert_config(flags: argparse.Namespace) -> BertConfig:
    return BertConfig(flags.bert_binary_head, flags.mask_prob, flags.short_seq_prob, flags.masking_max_ngram,
                      flags.whole_word_masking)
