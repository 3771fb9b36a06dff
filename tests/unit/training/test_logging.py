"""The log line and validation block read like Megatron's: no LTD fields in a dense run, Megatron's
wording for the test-set block."""

from megatron.training.logging import format_train_line, format_validation_block

LTD_FIELDS = ("kept length", "consumed layer tokens", "layer-token saving")


def metrics(random_ltd: bool) -> dict:
    return {"iteration": 10, "train_iters": 20, "consumed_samples": 80, "elapsed_ms_per_iteration": 12.5,
            "tokens_per_sec": 1000.0, "lr": 1e-3, "global_batch_size": 8, "lm_loss": 4.5,
            "random_ltd": random_ltd, "kept_length": 128, "consumed_layer_tokens": 4096,
            "layer_token_saving": 0.25, "loss_scale": 1.0, "grad_norm": 0.5, "skipped_iterations": 0,
            "nan_iterations": 0}


def test_dense_line_has_no_ltd_fields():
    line = format_train_line(metrics(random_ltd=False))
    assert not any(f in line for f in LTD_FIELDS), line
    # Megatron's fields, in Megatron's order
    fields = [p.split(":")[0].strip() for p in line.split(" | ")[1:] if ":" in p]
    assert fields == ["consumed samples", "elapsed time per iteration (ms)", "tokens per second",
                      "learning rate", "global batch size", "lm loss", "loss scale", "grad norm",
                      "number of skipped iterations", "number of nan iterations"]


def test_ltd_line_has_ltd_fields():
    line = format_train_line(metrics(random_ltd=True))
    assert "kept length:   128 | consumed layer tokens: 4096 | layer-token saving: 25.00% |" in line


def test_validation_blocks_use_megatron_wording():
    valid = format_validation_block(5, 2.0).splitlines()
    test = format_validation_block(5, 2.0, name="test").splitlines()
    assert valid[1].startswith(" validation loss at iteration 5 on validation set | lm loss value: 2.000000E+00 |")
    assert test[1].startswith(" validation loss at iteration 5 on test set | lm loss value: 2.000000E+00 |")
    assert valid[0] == valid[2] == "-" * len(valid[1])
