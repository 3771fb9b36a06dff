"""Sequence parallelism trains the model one process trains, and random-LTD keeps the same tokens in it.

With `--sequence-parallel` the residual stream, norms and dropouts of each TP rank hold its chunk of the
sequence. The truth is the single-process run (dropout off, fp32, 10 iterations, random-LTD mid-ramp
reaching the full length at iteration 9, so the LTD layers change from routed to dense within the run):

- TP=2 and TP=4, random-LTD on and off, learned positions and RoPE, with full recomputation, and
  TP=2 x PP=2 x DP=2 with the distributed optimizer: every iteration's loss within 1e-5 relative.
- The kept indices every rank uses in every LTD layer are the single-process ones (recorded, compared), and
  every routed layer takes its route from the plan, made on the host with the draw.
- The gradients of the LayerNorm parameters equal the single-process ones, and are wrong without the TP
  all-reduce of `sequence_parallel` gradients (so the test sees that all-reduce).
- The LayerNorm/dropout/residual part of a layer's saved activations falls by tp per rank (measured).
- A checkpoint saved with --sequence-parallel resumes without it and the reverse.
"""

import hashlib
import json

import pytest
import torch

from megatron.core import parallel_state as ps
from megatron.core.distributed import DataParallelGradSync
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.config import TransformerConfig
from tests.distributed.launcher import GLOO, run_distributed
from tests.distributed.test_gpt_equivalence import BASE, LTD, close, data, run_layout  # noqa: F401 (fixture)
from tests.functional.gpt_cli import read_json_lines, run_inprocess, train_records

SP = ["--sequence-parallel"]
VOCAB = ["--make-vocab-size-divisible-by", "32"]  # the same padded vocabulary at TP = 1, 2 and 4


def _run(tmp_path, data, name, tp, pp, dp, extra):  # noqa: F811
    log = tmp_path / f"{name}.jsonl"
    run_layout(BASE + ["--data-path", data, "--log-json", str(log)] + VOCAB + extra, tp, pp, dp)
    return train_records(log)


@pytest.mark.parametrize("ltd", [False, True], ids=["dense", "ltd"])
def test_sequence_parallel_matches_single_process(tmp_path, data, ltd):  # noqa: F811
    extra = LTD if ltd else []
    ref = _run(tmp_path, data, "single", 1, 1, 1, extra)
    layouts = {"tp2": (2, 1, 1, []), "tp4": (4, 1, 1, [])}
    if ltd:
        layouts["tp2-pp2-dp2-distopt"] = (2, 2, 2, ["--use-distributed-optimizer"])
    for name, (tp, pp, dp, more) in layouts.items():
        recs = _run(tmp_path, data, name, tp, pp, dp, extra + SP + more)
        assert [r["iteration"] for r in recs] == list(range(1, 11)), name
        for a, b in zip(ref, recs):
            assert a["kept_length"] == b["kept_length"]
            assert close(a["lm_loss"], b["lm_loss"], 1e-5), (name, a["iteration"], a["lm_loss"], b["lm_loss"])
            assert close(a["grad_norm"], b["grad_norm"], 1e-4), (name, a["iteration"])
        vals = [[r["val_loss"] for r in read_json_lines(tmp_path / f"{n}.jsonl") if "val_loss" in r] for n in ("single", name)]
        assert len(vals[0]) == len(vals[1]) == 2 and all(close(x, y, 1e-5) for x, y in zip(*vals)), (name, vals)
    if ltd:
        assert ref[0]["kept_length"] == 8 and ref[-1]["kept_length"] == 32


def test_rope_and_recompute_with_sequence_parallel_ltd(tmp_path, data):  # noqa: F811
    """RoPE rotates each kept token by its original position on its list owner; full recomputation
    reruns the routed layers on the same route."""
    extra = LTD + ["--position-embedding-type", "rope"]
    ref = _run(tmp_path, data, "single", 1, 1, 1, extra)
    recs = _run(tmp_path, data, "tp2", 2, 1, 1, extra + SP + ["--recompute-granularity", "full",
                                                             "--recompute-method", "uniform"])
    for a, b in zip(ref, recs):
        assert close(a["lm_loss"], b["lm_loss"], 1e-5), (a["iteration"], a["lm_loss"], b["lm_loss"])


def _record_indices(out_path, argv):
    """Run the trainer, writing every (iteration, sample ids, layer) -> hash of the kept indices used. Under
    sequence parallelism also check that every routed layer got its route from the plan (made on the host
    with the draw, so the layer computes nothing that waits for the device): the key "unplanned routes"."""
    from megatron.core.random_ltd import routing

    seen, unplanned = {}, []
    real, real_sp = routing.RandomLTDState.indices_for, routing.run_layer_on_kept_sequence_parallel

    def spy(self, layer_number, seq_length):
        idx = real(self, layer_number, seq_length)
        if idx is not None:
            key = f"{self.iteration}:{self.sample_ids.tolist()}:{layer_number}"
            seen[key] = hashlib.sha256(idx.cpu().numpy().tobytes()).hexdigest()
        return idx

    def spy_sp(layer, chunk, idx, position_ids=None, padding_mask=None, route=None):
        unplanned.append(route is None)
        return real_sp(layer, chunk, idx, position_ids, padding_mask, route)

    routing.RandomLTDState.indices_for, routing.run_layer_on_kept_sequence_parallel = spy, spy_sp
    try:
        assert run_inprocess(argv) == 0
    finally:
        routing.RandomLTDState.indices_for, routing.run_layer_on_kept_sequence_parallel = real, real_sp
    if unplanned:
        seen["unplanned routes"] = sum(unplanned)
    with open(out_path, "w") as f:
        json.dump(seen, f)


def _record_on_rank(rank, world, argv, out_dir):
    _record_indices(f"{out_dir}/rank{rank}.json", argv)


def test_every_rank_keeps_the_single_process_tokens(tmp_path, data):  # noqa: F811
    argv = BASE + ["--data-path", data, "--eval-iters", "0"] + VOCAB + LTD
    _record_indices(tmp_path / "single.json", argv)
    single = json.loads((tmp_path / "single.json").read_text())
    assert len(single) > 0
    run_distributed(_record_on_rank, world_size=4, tp=4,
                    args=(argv + SP + GLOO + ["--tensor-model-parallel-size", "4"], str(tmp_path)))
    for rank in range(4):
        mine = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert mine.pop("unplanned routes") == 0, "a routed layer worked out its own route"
        assert mine == single, f"TP rank {rank} kept other tokens than the single process"


CONFIG = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=16, vocab_size=64,
              hidden_dropout=0.0, attention_dropout=0.0)


def _norm_grads(rank, world, expected, allreduce):
    model = GPTModel(TransformerConfig(**CONFIG, sequence_parallel=True))
    sync = DataParallelGradSync(model.parameters())
    tokens = torch.arange(2 * 16).view(2, 16) % 64
    model(tokens, labels=tokens).mean().backward()
    if allreduce:
        sync.allreduce_sequence_parallel_grads(ps.get_tensor_model_parallel_group())
    for name, p in model.named_parameters():
        if "layernorm" in name:
            assert getattr(p, "sequence_parallel", False), name
            if allreduce:
                torch.testing.assert_close(p.main_grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)
            else:
                assert not torch.allclose(p.main_grad, expected[name], rtol=1e-3, atol=1e-5), name


def test_layernorm_gradients_equal_the_single_process_ones():
    ps.destroy_model_parallel()
    model = GPTModel(TransformerConfig(**CONFIG))
    tokens = torch.arange(2 * 16).view(2, 16) % 64
    model(tokens, labels=tokens).mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if "layernorm" in n}
    run_distributed(_norm_grads, world_size=2, tp=2, args=(expected, True))
    run_distributed(_norm_grads, world_size=2, tp=2, args=(expected, False))  # without the all-reduce: wrong


def _replicated_part_bytes(sequence_parallel: bool) -> int:
    """Bytes a layer saves for backward outside its attention and MLP: norms, dropout masks, residual."""
    config = TransformerConfig(**{**CONFIG, "hidden_dropout": 0.1, "seq_length": 32}, sequence_parallel=sequence_parallel)
    model = GPTModel(config).train()
    layer = model.decoder.layers[0]
    saved, inside = {}, [0]

    def pack(t):
        if not inside[0] and not isinstance(t, torch.nn.Parameter):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    def pause(module, args):
        inside[0] += 1

    def resume(module, args, out):
        inside[0] -= 1

    for sub in (layer.self_attention, layer.mlp):
        sub.register_forward_pre_hook(pause)
        sub.register_forward_hook(resume)
    tokens = torch.arange(2 * 32).view(2, 32) % 64
    hidden = model.embedding(tokens, torch.arange(32).expand(2, 32))  # [b, s(/tp), h]
    hidden = hidden.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(hidden, position_ids=torch.arange(32).expand(2, 32))
    return sum(saved.values())


def _measure(rank, world, out_dir):
    both = {"tp": _replicated_part_bytes(False), "sp": _replicated_part_bytes(True)}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(both))


def test_norm_dropout_residual_activations_fall_by_tp(tmp_path):
    run_distributed(_measure, world_size=2, tp=2, args=(tmp_path,))
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["tp"] > 0 and got["tp"] == 2 * got["sp"], got


def test_checkpoint_moves_between_sequence_parallel_and_not(tmp_path, data):  # noqa: F811
    argv = BASE + ["--data-path", data, "--save-interval", "5"] + VOCAB + LTD
    straight = _run(tmp_path, data, "straight", 2, 1, 1, LTD + SP + ["--save", str(tmp_path / "a")])
    for first, second, name in ((SP, [], "b"), ([], SP, "c")):
        ck = str(tmp_path / name)
        log = tmp_path / f"{name}.jsonl"
        run_layout(argv + first + ["--save", ck, "--log-json", str(log), "--exit-interval", "5"], 2, 1, 1)
        run_layout(argv + second + ["--save", ck, "--load", ck, "--log-json", str(log)], 2, 1, 1)
        recs = train_records(log)
        assert [r["iteration"] for r in recs] == list(range(1, 11))
        for a, b in zip(straight, recs):
            assert close(a["lm_loss"], b["lm_loss"], 1e-5), (name, a["iteration"], a["lm_loss"], b["lm_loss"])
