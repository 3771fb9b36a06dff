"""GPT model: shapes, tied weights, causality, Megatron's init, loss at init ~ ln(V)."""

import math

import pytest
import torch

from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.config import TransformerConfig


def tiny(**kw):
    base = dict(num_layers=3, hidden_size=64, num_attention_heads=4, seq_length=32, vocab_size=128,
                hidden_dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


@pytest.mark.parametrize("variant", [
    {},
    dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False),
    dict(untie_embeddings_and_output_weights=True),
])
def test_forward_shapes_and_causality(variant):
    torch.manual_seed(0)
    model = GPTModel(tiny(**variant)).eval()
    tokens = torch.randint(0, 128, (2, 32))
    logits = model(tokens)
    assert logits.shape == (2, 32, 128)
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % 128
    logits2 = model(changed)
    torch.testing.assert_close(logits[:, :20], logits2[:, :20])  # the future does not leak into the past
    assert not torch.allclose(logits[:, 20:], logits2[:, 20:])


def test_tied_and_untied_parameters():
    tied = GPTModel(tiny())
    assert tied.output_layer is None and tied.output_weight() is tied.embedding.word_embeddings.weight
    untied = GPTModel(tiny(untie_embeddings_and_output_weights=True))
    n_tied = sum(p.numel() for p in tied.parameters())
    assert sum(p.numel() for p in untied.parameters()) == n_tied + 128 * 64
    # Parameter count from the formula: embeddings + positions + L * (qkv + proj + fc1 + fc2 + 2 norms) + final norm
    h, f, L, V, s = 64, 256, 3, 128, 32
    per_layer = (3 * h * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h) + 4 * h
    assert n_tied == V * h + s * h + L * per_layer + 2 * h


def test_megatron_init_and_initial_loss():
    torch.manual_seed(0)
    cfg = tiny(num_layers=4, hidden_size=128, vocab_size=512, init_method_std=0.02)
    model = GPTModel(cfg)
    qkv = model.decoder.layers[0].self_attention.linear_qkv.weight
    proj = model.decoder.layers[0].self_attention.linear_proj.weight
    assert abs(qkv.std().item() - 0.02) < 0.002
    assert abs(proj.std().item() - 0.02 / math.sqrt(8)) < 0.001
    assert torch.all(model.decoder.layers[0].self_attention.linear_qkv.bias == 0)
    tokens = torch.randint(0, 512, (4, 32))
    loss = model(tokens, labels=tokens.roll(-1, 1))
    assert loss.shape == (4, 32) and loss.dtype == torch.float32
    assert abs(loss.mean().item() - math.log(512)) < 0.1


def test_position_ids_reach_the_model():
    torch.manual_seed(0)
    model = GPTModel(tiny(position_embedding_type="rope")).eval()
    tokens = torch.randint(0, 128, (1, 8))
    pos = torch.arange(8)[None]
    a = model(tokens, pos)
    b = model(tokens, pos + 3)  # RoPE: a uniform shift changes nothing (relative positions)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    learned = GPTModel(tiny()).eval()
    assert not torch.allclose(learned(tokens, pos), learned(tokens, pos + 3))


def test_random_ltd_only_in_training_and_only_below_full_length():
    from megatron.core.random_ltd import RandomLTDState

    torch.manual_seed(0)
    model = GPTModel(tiny(num_layers=4))
    tokens = torch.randint(0, 128, (2, 32))
    ids = torch.arange(2)

    def state(keep):
        return RandomLTDState(seed=1, iteration=0, sample_ids=ids, kept_length=keep, layers=frozenset({1, 2}))

    model.train()  # dropout is 0, so train mode differs from eval only through token dropping
    dense = model(tokens)
    assert not torch.allclose(model(tokens, ltd=state(8)), dense)
    torch.testing.assert_close(model(tokens, ltd=state(32)), dense)  # r >= s: full sequence
    model.eval()
    torch.testing.assert_close(model(tokens, ltd=state(8)), dense)  # evaluation always sees every token
    # causality still holds with dropping: a later token cannot change an earlier position's logits
    model.train()
    changed = tokens.clone()
    changed[:, 20:] = (changed[:, 20:] + 1) % 128
    torch.testing.assert_close(model(tokens, ltd=state(8))[:, :20], model(changed, ltd=state(8))[:, :20])
