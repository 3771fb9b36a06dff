"""The lm-eval adapter scores exactly what a direct, one-sequence-at-a-time computation with the model gives:
batching, padding, sorting, empty contexts, left truncation, rolling windows and greedy generation."""

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from megatron.evaluation.checkpoint_model import load_gpt_checkpoint
from megatron.evaluation.lm_eval_adapter import MegatronGPTLM
from tests.unit.evaluation import fixtures


@pytest.fixture(scope="module", params=sorted(fixtures.ARCHS))
def gpt(request, tmp_path_factory):
    return load_gpt_checkpoint(fixtures.tiny_setup(tmp_path_factory)[request.param])


def logprobs(gpt, ids):
    """[n, V] log-probabilities of one unpadded sequence."""
    with torch.no_grad():
        return F.log_softmax(gpt.model(torch.tensor([ids]))[0].float(), dim=-1)


def direct_loglikelihood(gpt, context, continuation):
    tok, L = gpt.tokenizer.tokenize, gpt.config.max_position_embeddings
    if context:
        ctx = tok(context)
        cont = tok(context + continuation)[len(ctx):]
    else:
        ctx, cont = [gpt.tokenizer.eod], tok(continuation)
    whole = (ctx + cont)[-(L + 1):]
    lp = logprobs(gpt, whole[:-1])[-len(cont):]  # [c, V]: the positions predicting the continuation
    target = torch.tensor(cont)
    return lp.gather(1, target[:, None]).sum().item(), bool((lp.argmax(-1) == target).all())


def direct_rolling(gpt, text):
    """Sum of log p(token) over the document: first L tokens after EOD, then chunks of L, each conditioned
    on the L tokens before its last one (lm-eval's disjoint windows)."""
    ids, L, eod = gpt.tokenizer.tokenize(text), gpt.config.max_position_embeddings, gpt.tokenizer.eod
    first = ids[:L]
    lp = logprobs(gpt, [eod] + ids[:L - 1])
    total = sum(lp[i, t].item() for i, t in enumerate(first))
    for a in range(L, len(ids), L):
        b = min(a + L, len(ids))
        lp = logprobs(gpt, ids[b - L - 1:b - 1])  # position p predicts ids[b - L + p]
        total += sum(lp[j - (b - L), ids[j]].item() for j in range(a, b))
    return total


def direct_greedy(gpt, context, until, max_gen):
    seq = gpt.tokenizer.tokenize(context)[-(gpt.config.max_position_embeddings - max_gen):]
    out = []
    for _ in range(max_gen):
        tok = logprobs(gpt, seq)[-1, :gpt.tokenizer.vocab_size].argmax().item()
        if tok == gpt.tokenizer.eod:
            break
        seq.append(tok)
        out.append(tok)
    text = gpt.tokenizer.detokenize(out)
    for u in until:
        text = text.split(u)[0]
    return text


def requests(kind, args):
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_equals_direct_computation(gpt):
    long_context = fixtures.sentence(__import__("random").Random(5), 120)  # longer than the window
    pairs = [("the cat sat on the", " mat"), ("", "a dog ran"), ("blue", " river under the tree"),
             (long_context, " moon"), ("the big red house", " and then")]
    lm = MegatronGPTLM(gpt.model, gpt.tokenizer, batch_size=2)
    assert len(gpt.tokenizer.tokenize(long_context)) > lm.max_length
    got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    for (ctx, cont), (score, greedy) in zip(pairs, got):
        want_score, want_greedy = direct_loglikelihood(gpt, ctx, cont)
        assert score == pytest.approx(want_score, rel=1e-5, abs=1e-4)
        assert greedy == want_greedy


def test_rolling_loglikelihood_equals_direct_computation(gpt):
    rng = __import__("random").Random(6)
    docs = [fixtures.sentence(rng, 150), fixtures.sentence(rng, 4), fixtures.sentence(rng, 40)]
    lm = MegatronGPTLM(gpt.model, gpt.tokenizer, batch_size=3)
    assert len(gpt.tokenizer.tokenize(docs[0])) > 2 * lm.max_length  # three windows
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(d,) for d in docs]))
    for doc, score in zip(docs, got):
        assert score == pytest.approx(direct_rolling(gpt, doc), rel=1e-5, abs=1e-4)
    short = gpt.tokenizer.tokenize(docs[1])  # a short document is one pass after EOD
    lp = logprobs(gpt, [gpt.tokenizer.eod] + short[:-1])
    assert got[1] == pytest.approx(sum(lp[i, t].item() for i, t in enumerate(short)), abs=1e-4)


def test_generate_until_equals_direct_greedy_decoding(gpt):
    contexts = ["Q: the cat\nA:", "a", "the big red house under the tree and"]
    lm = MegatronGPTLM(gpt.model, gpt.tokenizer, batch_size=2)
    free = [direct_greedy(gpt, c, [], 6) for c in contexts]
    got = lm.generate_until(requests("generate_until", [(c, {"max_gen_toks": 6}) for c in contexts]))
    assert got == free
    stops = [[t[len(t) // 2]] if t else ["\n"] for t in free]  # a stop string inside each free text
    got = lm.generate_until(requests("generate_until",
                                     [(c, {"until": s, "max_gen_toks": 6}) for c, s in zip(contexts, stops)]))
    assert got == [direct_greedy(gpt, c, s, 6) for c, s in zip(contexts, stops)]
    assert all(len(g) < len(f) or not f for g, f in zip(got, free))


def test_single_process_hooks_and_settings(gpt):
    lm = MegatronGPTLM(gpt.model, gpt.tokenizer, batch_size="auto")
    assert (lm.rank, lm.world_size, lm.batch_size) == (0, 1, 8)
    assert lm.eot_token_id == lm.prefix_token_id == gpt.tokenizer.eod
    assert lm.max_length == gpt.config.max_position_embeddings
    t = torch.tensor(3)
    assert lm.all_gather(t) is t and lm.gather_object("x") == ["x"]
    assert lm.tok_encode("the cat") == gpt.tokenizer.tokenize("the cat")
    with pytest.raises(Exception, match="max_gen_toks"):
        lm.generate_until(requests("generate_until", [("a", {"max_gen_toks": lm.max_length})]))


def test_registered_name_loads_a_checkpoint(tmp_path_factory):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    setup = fixtures.tiny_setup(tmp_path_factory)
    results = simple_evaluate(model="megatron-gpt", model_args=f"load={setup['gpt2']}", tasks=["tiny_mc"],
                              batch_size="2", task_manager=TaskManager(include_path=setup["tasks"],
                                                                       include_defaults=False),
                              bootstrap_iters=0)
    gpt = load_gpt_checkpoint(setup["gpt2"])
    direct = fixtures.evaluate(MegatronGPTLM(gpt.model, gpt.tokenizer), setup["tasks"], tasks=["tiny_mc"])
    assert fixtures.metrics(results) == fixtures.metrics(direct)


def test_generation_without_max_gen_toks_fits_a_small_window(gpt, tmp_path, tmp_path_factory, caplog):
    """A task without max_gen_toks (triviaqa's kind) on the L=64 model: at most L // 2 new tokens, logged once;
    only an explicit request that cannot fit is an error."""
    import logging
    import os

    tasks = fixtures.tiny_setup(tmp_path_factory)["tasks"]
    body = open(os.path.join(tasks, "tiny_gen.yaml")).read()
    assert "  max_gen_toks: 6\n" in body
    (tmp_path / "tiny_gen_default.yaml").write_text(
        body.replace("task: tiny_gen", "task: tiny_gen_default").replace("  max_gen_toks: 6\n", "")
        .replace('until: ["\\n", "."]', "until: []"))
    lm = MegatronGPTLM(gpt.model, gpt.tokenizer, batch_size=2)
    with caplog.at_level(logging.WARNING, logger="megatron.evaluation.lm_eval_adapter"):
        results = fixtures.evaluate(lm, str(tmp_path), tasks=["tiny_gen_default"], limit=3)
        lm.generate_until(requests("generate_until", [("a", {})]))  # again: no second warning
    warnings = [r.getMessage() for r in caplog.records if "max_gen_toks" in r.getMessage()]
    assert len(warnings) == 1 and "at most 32 tokens" in warnings[0]
    samples = results["samples"]["tiny_gen_default"]
    assert len(samples) == 3
    for sample in samples:
        context = sample["arguments"][0][0]
        assert sample["resps"][0][0] == direct_greedy(gpt, context, [], gpt.config.max_position_embeddings // 2)
    with pytest.raises(Exception, match="a task asks for max_gen_toks 64"):
        lm.generate_until(requests("generate_until", [("a", {"max_gen_toks": 64})]))


def test_sampling_is_warned_about_and_the_callers_mode_is_kept(gpt, caplog):
    import logging

    lm = MegatronGPTLM(gpt.model, gpt.tokenizer, batch_size=2)
    greedy = lm.generate_until(requests("generate_until", [("the cat", {"max_gen_toks": 4})]))
    gpt.model.train()  # e.g. evaluating inside a training loop
    try:
        with caplog.at_level(logging.WARNING, logger="megatron.evaluation.lm_eval_adapter"):
            sampled = lm.generate_until(requests("generate_until", [("the cat", {"max_gen_toks": 4, "do_sample": True,
                                                                             "temperature": 1.0})]))
        assert gpt.model.training  # restored after the batch
        assert sampled == greedy  # greedy all the same, and in eval mode (no dropout)
        assert any("generates greedily" in r.getMessage() for r in caplog.records)
        lm.loglikelihood(requests("loglikelihood", [("the", " cat")]), disable_tqdm=True)
        assert gpt.model.training
    finally:
        gpt.model.eval()
