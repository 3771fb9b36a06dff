"""Saved args <-> TransformerConfig: one mapping, the dataclass's own defaults, the model built on meta."""

import dataclasses

import pytest
import torch

from megatron.checkpoint import model_args
from megatron.checkpoint.model_args import (
    args_from_transformer_config, build_model_from_args, check_model_flags, transformer_config_from_args,
)
from megatron.core.errors import UserError
from megatron.core.models.bert import BertModel
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.config import TransformerConfig

MINIMAL = {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 16, "padded_vocab_size": 128}
LLAMA = {**MINIMAL, "max_position_embeddings": 32, "ffn_hidden_size": 96, "position_embedding_type": "rope",
         "rotary_base": 500000, "normalization": "RMSNorm", "norm_epsilon": 1e-6, "swiglu": True,
         "disable_bias_linear": True, "hidden_dropout": 0.0, "attention_dropout": 0.05, "init_method_std": 0.01,
         "untie_embeddings_and_output_weights": True, "rotary_percent": 1.0, "group_query_attention": False,
         "num_query_groups": None, "openai_gelu": False}


def test_flags_map_to_config_fields_and_back():
    config = transformer_config_from_args({**LLAMA, "lr": 3e-4, "tokenizer_type": "NullTokenizer"})  # others ignored
    assert (config.vocab_size, config.layernorm_epsilon, config.add_bias_linear, config.causal) == (128, 1e-6, False, True)
    assert args_from_transformer_config(config) == LLAMA
    assert transformer_config_from_args(args_from_transformer_config(config)) == config
    bert = transformer_config_from_args({**MINIMAL, "model_type": "bert"})
    assert not bert.causal and args_from_transformer_config(bert)["model_type"] == "bert"


def test_absent_flags_take_the_dataclass_defaults():
    config = transformer_config_from_args({**MINIMAL, "ffn_hidden_size": None})  # None: not given
    derived = {"max_position_embeddings": 16, "ffn_hidden_size": 256,  # from seq_length and hidden_size
               "num_query_groups": 4}  # one group per head: plain multi-head attention
    for f in dataclasses.fields(TransformerConfig):
        if f.default is not dataclasses.MISSING:
            assert getattr(config, f.name) == derived.get(f.name, f.default), f.name
    assert transformer_config_from_args(MINIMAL, hidden_dropout=0.0).hidden_dropout == 0.0  # overrides win
    with pytest.raises(UserError, match="lack seq_length, padded_vocab_size"):
        transformer_config_from_args({k: v for k, v in MINIMAL.items() if k not in ("seq_length", "padded_vocab_size")})


def test_meta_model_draws_no_weights(monkeypatch):
    def no_draw(*args, **kwargs):
        raise AssertionError("initial weights drawn for a meta model")

    monkeypatch.setattr("megatron.core.models.init.full_init", no_draw)
    gpt = build_model_from_args(LLAMA, device="meta")
    assert isinstance(gpt, GPTModel) and all(p.is_meta for p in gpt.parameters())
    fc1 = gpt.decoder.layers[1].mlp.linear_fc1.weight
    assert fc1.shape == (192, 64) and (fc1.partition_dim, fc1.partition_stride) == (0, 2)
    last = build_model_from_args({**MINIMAL, "model_type": "bert"}, pre_process=False, layer_offset=1,
                                 num_local_layers=1, device="meta")
    assert isinstance(last, BertModel) and last.binary_head is not None and last.embedding is None
    assert last.global_param_name("output_layer.weight") == "embedding.word_embeddings.weight"  # the tied copy
    assert build_model_from_args({**MINIMAL, "model_type": "bert", "bert_binary_head": False}, device="meta").pooler is None


def test_cpu_model_is_the_trainers():
    config = transformer_config_from_args(MINIMAL)
    want = GPTModel(config).state_dict()
    got = build_model_from_args(MINIMAL).state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)


def test_check_model_flags_takes_two_dicts():
    saved = {**LLAMA, "bert_binary_head": True}
    check_model_flags(saved, {**saved, "lr": 1.0, "max_position_embeddings": 64}, "ck")  # rope: no table
    check_model_flags({"hidden_size": 64}, {"num_layers": 3}, "ck")  # flags one side lacks are not compared
    with pytest.raises(UserError, match=r"^ck has another model: --num-layers 2 in the checkpoint, 3 here; "
                                        r"padded_vocab_size 128 in the checkpoint, 256 here; use"):
        check_model_flags(saved, {**saved, "num_layers": 3, "padded_vocab_size": 256}, "ck")
    assert "rotary_base" in model_args.POSITION_FLAGS["rope"]
