"""BERT model: bidirectional encoder, padding, tied MLM head, SOP head, Megatron names and init, and
random-LTD on the encoder checked against running each layer on each sample's extracted tokens."""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron.core.models.bert import BertModel
from megatron.core.random_ltd import RandomLTDState
from megatron.core.tensor_parallel import vocab_parallel_top1_correct
from megatron.core.transformer.config import TransformerConfig

V, S = 128, 16


def tiny(**kw):
    base = dict(num_layers=4, hidden_size=32, num_attention_heads=4, seq_length=S, vocab_size=V,
                hidden_dropout=0.0, attention_dropout=0.0, causal=False)
    base.update(kw)
    return TransformerConfig(**base)


def batch(b=3, lengths=(16, 11, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(5, V, (b, S), generator=g)  # [b, s]
    pad = torch.arange(S)[None, :] >= torch.tensor(lengths)[:, None]  # [b, s], True = padded
    tokens = tokens.masked_fill(pad, 0)
    types = (torch.arange(S)[None, :] >= torch.tensor(lengths)[:, None] // 2).long() & ~pad  # [b, s]
    return tokens, types, pad


@pytest.mark.parametrize("variant", [
    {},
    dict(position_embedding_type="rope", normalization="RMSNorm", swiglu=True, add_bias_linear=False),
    dict(untie_embeddings_and_output_weights=True),
])
def test_bidirectional_padding_invariant_and_heads(variant):
    torch.manual_seed(0)
    model = BertModel(tiny(**variant)).eval()
    tokens, types, pad = batch()
    out = model(tokens, types, pad)
    assert out.lm_logits.shape == (3, S, V) and out.binary_logits.shape == (3, 2)
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % V
    assert not torch.allclose(model(changed, types, pad).lm_logits[0, 0], out.lm_logits[0, 0]), "sees the future"
    repadded = tokens.masked_fill(pad, 7)  # other ids in the padded slots
    again = model(repadded, types, pad)
    real = ~pad
    torch.testing.assert_close(again.lm_logits[real], out.lm_logits[real])
    torch.testing.assert_close(again.binary_logits, out.binary_logits)


def test_mlm_head_tied_to_word_embeddings_and_sop_on_first_token():
    torch.manual_seed(0)
    model = BertModel(tiny()).eval()
    tokens, types, pad = batch()
    hidden = model.encode(tokens, types, pad)  # [b, s, h]
    x = model.lm_head.layer_norm(F.gelu(model.lm_head.dense(hidden)))
    expected = x @ model.embedding.word_embeddings.weight.T + model.output_layer.bias  # [b, s, V]
    out = model(tokens, types, pad)
    torch.testing.assert_close(out.lm_logits, expected)
    assert not hasattr(model.output_layer, "weight"), "one stage, tied: the embedding matrix is the output weight"
    pooled = torch.tanh(model.pooler.dense(hidden[:, 0]))
    torch.testing.assert_close(out.binary_logits, model.binary_head(pooled))
    # only the first token reaches the SOP head through the pooler
    hidden2 = hidden.clone()
    hidden2[:, 1:] += 1.0
    torch.testing.assert_close(model.binary_head(model.pooler(hidden2)), out.binary_logits)


def test_megatron_names_init_and_initial_losses():
    torch.manual_seed(0)
    model = BertModel(tiny(num_layers=2, hidden_size=64, vocab_size=512))
    names = dict(model.named_parameters())
    for key in ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
                "embedding.tokentype_embeddings.weight", "encoder.layers.1.self_attention.linear_qkv.weight",
                "encoder.final_layernorm.weight", "lm_head.dense.weight", "lm_head.layer_norm.weight",
                "output_layer.bias", "pooler.dense.weight", "binary_head.weight", "binary_head.bias"):
        assert key in names, key
    assert torch.all(names["lm_head.layer_norm.weight"] == 1) and torch.all(names["output_layer.bias"] == 0)
    assert abs(names["lm_head.dense.weight"].std().item() - 0.02) < 0.003
    assert names["embedding.tokentype_embeddings.weight"].shape == (2, 64)
    tokens = torch.randint(5, 512, (4, S))
    out = model(tokens, torch.zeros_like(tokens), labels=tokens)
    assert out.lm_loss.shape == (4, S) and out.lm_loss.dtype == torch.float32
    assert abs(out.lm_loss.mean().item() - math.log(512)) < 0.1
    assert abs(F.cross_entropy(out.binary_logits, torch.zeros(4, dtype=torch.long)).item() - math.log(2)) < 0.05
    bare = BertModel(tiny(), add_binary_head=False)
    assert bare.pooler is None and bare.binary_head is None and bare.embedding.tokentype_embeddings is None
    assert bare(tokens[:, :S] % V, labels=tokens % V).binary_logits is None


def test_mlm_correct_is_top1():
    logits = torch.randn(4, 7, 50)
    target = torch.randint(0, 50, (4, 7))
    target[0] = logits[0].argmax(-1)
    torch.testing.assert_close(vocab_parallel_top1_correct(logits, target), logits.argmax(-1) == target)


def ltd_state(b, keep, layers=frozenset({1, 2}), iteration=3):
    return RandomLTDState(seed=11, iteration=iteration, sample_ids=torch.arange(b), kept_length=keep, layers=layers)


def reference_encode(model, tokens, types, pad, ltd):
    """Each sample alone, each layer on that sample's kept REAL tokens only (no padding mask at all):
    what the padding mask gathered per sample must be equivalent to."""
    s = tokens.shape[1]
    pos = torch.arange(s)
    hidden = model.embedding(tokens, pos.expand_as(tokens), types).clone()  # [b, s, h]
    for layer in model.encoder.layers:
        idx = ltd.indices_for(layer.layer_number, s)  # [b, r] or None
        for i in range(tokens.shape[0]):
            keep = pos if idx is None else idx[i]
            real = keep[~pad[i, keep]]  # [n_i] kept, not padding
            if len(real):
                y = layer(hidden[i, real][None], position_ids=real[None])  # [1, n_i, h]
                hidden[i, real] = y[0]
    return model.encoder.final_layernorm(hidden)


@pytest.mark.parametrize("keep", [6, 10])
def test_ltd_padding_mask_equals_layer_on_extracted_tokens(keep):
    torch.manual_seed(0)
    model = BertModel(tiny(position_embedding_type="rope")).train()  # dropout 0: train mode only drops tokens
    tokens, types, pad = batch(b=4, lengths=(16, 11, 5, 2))
    ltd = ltd_state(4, keep)
    with torch.no_grad():
        got = model.encode(tokens, types, pad, ltd=ltd)  # [b, s, h]
        ref = reference_encode(model, tokens, types, pad, ltd)
        dense = model.encode(tokens, types, pad)
    real = ~pad
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got[real], dense[real], atol=1e-3), "tokens were really dropped"
    assert torch.isfinite(got).all()


def test_short_sample_whose_kept_tokens_are_all_padding_stays_finite():
    """A 2-token sample keeping 3 of 16 positions keeps only padding in a layer about 2 times in 3:
    its attention has no key left, which must not turn the batch NaN."""
    torch.manual_seed(0)
    model = BertModel(tiny()).train()
    tokens, types, pad = batch(b=4, lengths=(16, 11, 5, 2))
    all_pad = []
    for it in range(6):
        ltd = ltd_state(4, 3, iteration=it)
        all_pad += [bool(pad[3, ltd.indices_for(layer, S)].all()) for layer in (1, 2)]
        out = model(tokens, types, pad, labels=tokens, ltd=ltd)
        loss = out.lm_loss.mean() + out.binary_logits.float().logsumexp(-1).mean()
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        model.zero_grad()
    assert any(all_pad), "the case under test happened"


def test_first_and_last_layers_stay_dense_and_eval_sees_everything():
    torch.manual_seed(0)
    model = BertModel(tiny())
    seen = {}
    for layer in model.encoder.layers:
        layer.register_forward_hook(lambda mod, args, out: seen.__setitem__(mod.layer_number, out.shape[1]))
    tokens, types, pad = batch()
    model.train()
    model(tokens, types, pad, ltd=ltd_state(3, 6))
    assert seen == {0: S, 1: 6, 2: 6, 3: S}
    model.eval()
    model(tokens, types, pad, ltd=ltd_state(3, 6))
    assert seen == {0: S, 1: S, 2: S, 3: S}
