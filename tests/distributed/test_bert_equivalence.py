"""BERT trains the same model in every layout: TP=2, PP=2, TP=2 x PP=2, DP=2 and TP=2 x PP=2 with sequence
parallelism equal one process.

A tiny BERT (SwiGLU, so the stride-2 shards are covered) with random-LTD on padded samples, 8 iterations
from the same seed, dropout off: per-iteration MLM and SOP losses, accuracies and grad norms, and the
validation losses match the single-process run (up to floating-point reduction order). Then the
TP=2 x PP=2 checkpoint, merged by the fine-tuning loader, equals the single-process checkpoint.
"""

from tests.distributed.launcher import GLOO, run_distributed
from tests.functional import bert_cli

BASE = bert_cli.TINY + bert_cli.LTD + [
    "--swiglu", "--train-iters", "8", "--eval-interval", "4", "--micro-batch-size", "2", "--global-batch-size", "8",
    "--data-path", "synthetic"]
LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2), (2, 2, 1, "sp")]


def _train(rank, world, argv):
    from megatron.training.cli import run_cli

    assert run_cli(bert_cli.load_entry().main, argv) == 0


def run_layout(argv, tp, pp, dp):
    argv = argv + ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
    if tp * pp * dp == 1:
        assert bert_cli.run_inprocess(argv) == 0
    else:
        run_distributed(_train, world_size=tp * pp * dp, args=(argv + GLOO,))  # forked: inherits the synthetic data


def close(a, b, rel=2e-5):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-8)


def test_layouts_match_single_process_and_checkpoints_merge(tmp_path, monkeypatch):
    import torch

    from tasks.checkpoint import load_pretrained_bert
    from tests.functional.gpt_cli import read_json_lines

    bert_cli.use_synthetic_data(monkeypatch)
    argv = BASE + ["--vocab-file", bert_cli.write_vocab(tmp_path)]
    logs = {}
    for layout in LAYOUTS:
        tp, pp, dp = layout[:3]
        sp = ["--sequence-parallel"] if layout[3:] == ("sp",) else []
        name = f"tp{tp}pp{pp}dp{dp}{'sp' if sp else ''}"
        save = ["--save", str(tmp_path / name)] if layout in ((1, 1, 1), (2, 2, 1)) else []
        run_layout(argv + ["--log-json", str(tmp_path / f"{name}.jsonl")] + save + sp, tp, pp, dp)
        logs[layout] = read_json_lines(tmp_path / f"{name}.jsonl")
    ref = [r for r in logs[(1, 1, 1)] if "lm_loss" in r]
    assert len(ref) == 8 and ref[0]["kept_length"] == 8
    for layout, recs in logs.items():
        train = [r for r in recs if "lm_loss" in r]
        assert [r["iteration"] for r in train] == list(range(1, 9)), layout
        for a, b in zip(ref, train):
            assert a["kept_length"] == b["kept_length"], layout
            for key in ("lm_loss", "sop_loss"):
                assert close(a[key], b[key]), (layout, a["iteration"], key, a[key], b[key])
            assert close(a["grad_norm"], b["grad_norm"], 1e-4), (layout, a["iteration"], a["grad_norm"], b["grad_norm"])
            for key in ("mlm_accuracy", "sop_accuracy"):  # a near-tie may flip one prediction, no more
                assert abs(a[key] - b[key]) <= 0.05, (layout, a["iteration"], key, a[key], b[key])
        vals_a = [r for r in logs[(1, 1, 1)] if "val_loss" in r]
        vals_b = [r for r in recs if "val_loss" in r]
        assert len(vals_b) == 2, layout
        for a, b in zip(vals_a, vals_b):
            assert close(a["val_loss"], b["val_loss"]) and close(a["val_sop_loss"], b["val_sop_loss"]), layout

    # The sharded checkpoint, merged as fine-tuning loads it (shards joined by each parameter's own tags,
    # stage layer numbers shifted, the last stage's copy of the tied embeddings dropped), is the single one.
    single = load_pretrained_bert(str(tmp_path / "tp1pp1dp1"))
    merged = load_pretrained_bert(str(tmp_path / "tp2pp2dp1"))
    assert merged.iteration == 8 and sorted(single.state) == sorted(merged.state)
    assert {"output_layer.bias", "binary_head.weight", "encoder.layers.3.mlp.linear_fc1.weight"} <= set(merged.state)
    for key in single.state:
        torch.testing.assert_close(merged.state[key], single.state[key], atol=2e-5, rtol=1e-4, msg=key)
