"""The model flags -> `TransformerConfig`, shared by the GPT and BERT entry points."""

import argparse

from megatron.core.transformer.config import TransformerConfig


def transformer_config(args: argparse.Namespace, vocab_size: int, causal: bool = True) -> TransformerConfig:
    """`vocab_size` is the padded vocabulary; `causal` False for BERT's bidirectional encoder."""
    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        seq_length=args.seq_length, vocab_size=vocab_size, max_position_embeddings=args.max_position_embeddings,
        ffn_hidden_size=args.ffn_hidden_size, position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base, normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        swiglu=args.swiglu, add_bias_linear=not args.disable_bias_linear, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout, init_method_std=args.init_method_std,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights, causal=causal,
    )
