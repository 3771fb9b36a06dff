"""Convert a checkpoint between tensor- (TP) and pipeline-parallel (PP) layouts, and between the `torch`
and `torch_dist` formats (`--target-ckpt-format torch_dist`; either format is read).

Evaluation and export read one unsharded model; a run resumed on other hardware wants another TP/PP.
This tool merges whatever layout training wrote (GPT or BERT) and splits it for the target sizes:

    python tools/checkpoint_util.py --load ckpt/tp2pp2 --save ckpt/merged --merge
    python tools/checkpoint_util.py --load ckpt/merged --save ckpt/tp4pp2 \
        --target-tensor-parallel-size 4 --target-pipeline-parallel-size 2

The padded vocabulary is re-padded to what a run at the target TP computes when the tokenizer's size
is known (rebuilt from the saved tokenizer flags, or `--true-vocab-size`); padding rows are dropped or
added as zeros. The output keeps args (with the new sizes), iteration, the model and the counters. A
checkpoint of `--use-distributed-optimizer` keeps its optimizer too: each rank's `distrib_optim.pt` (fp32
parameters and Adam moments, per parameter) is re-split like the model, so resume with `--no-load-rng`.
It does not depend on the data-parallel size, hence no target DP size here: any DP resumes it. A plain
optimizer's state and the RNG states are dropped because they only make sense in the layout that wrote
them, so resume with `--no-load-optim --no-load-rng` (or `--finetune`). Nothing is written unless the whole conversion
succeeds: the files go through the trainer's crash-safe save protocol, the tracker file replaced last. A
full disk or a permission error is one `error:` line (exit 2) like any bad input. A checkpoint written by
Megatron-LM or Megatron-DeepSpeed (legacy `torch` format, any TP/PP) is read too and written in our format:
its weights (names mapped to ours), args and iteration; what our GPT lacks (MoE, ...) is refused in one line,
nothing written (docs/checkpoints.md, "From Megatron-LM"). Logic:
megatron/checkpoint/convert.py (whole checkpoints) and layout.py (each parameter's split, read off the model).
"""

import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megatron.checkpoint.convert import convert_checkpoint  # noqa: E402
from megatron.checkpoint.training import DISTRIB_OPTIM  # noqa: E402
from megatron.core.errors import UserError  # noqa: E402
from megatron.training.cli import ArgumentParser, run_cli  # noqa: E402


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description="Merge or re-split a Megatron checkpoint for other TP/PP sizes.")
    p.add_argument("--load", required=True, help="checkpoint root (holds latest_checkpointed_iteration.txt)")
    p.add_argument("--iteration", type=int, default=None, help="iteration to convert (default: the tracker's)")
    p.add_argument("--save", required=True, help="output root; must differ from --load")
    p.add_argument("--target-tensor-parallel-size", type=int, default=None)
    p.add_argument("--target-pipeline-parallel-size", type=int, default=None)
    p.add_argument("--merge", action="store_true", help="shorthand for target sizes 1 and 1 (unsharded)")
    p.add_argument("--target-ckpt-format", default="torch", choices=["torch", "torch_dist"],
                   help="torch: Megatron's legacy mp_rank_* files for the target TP/PP (default); torch_dist: one "
                        "layout-free checkpoint that any TP/PP/DP resumes, optimizer included (no target sizes)")
    p.add_argument("--true-vocab-size", type=int, default=None,
                   help="the tokenizer's size before padding (default: rebuild the tokenizer from the saved flags); "
                        "the padded vocabulary is re-padded as a run at the target TP computes it")
    return p


def target_sizes(args) -> tuple:
    tp, pp = args.target_tensor_parallel_size, args.target_pipeline_parallel_size
    if args.target_ckpt_format == "torch_dist":
        if tp is not None or pp is not None or args.merge:
            raise UserError("--target-ckpt-format torch_dist loads in any layout: drop --merge and the "
                            "--target-*-parallel-size flags")
        return 1, 1
    if args.merge:
        if (tp or 1) != 1 or (pp or 1) != 1:
            raise UserError("--merge means target sizes 1 and 1; drop it or the --target-* flags")
        return 1, 1
    if tp is None or pp is None:
        raise UserError("give --target-tensor-parallel-size and --target-pipeline-parallel-size, or --merge")
    return tp, pp


def convert(args, tp: int, pp: int) -> dict:
    """convert_checkpoint, with a file-system failure (a full disk, no permission) as one `error:` line
    instead of a traceback; a --save folder this run created is removed again, so nothing half-written
    stays (the library already writes through a temporary folder and replaces the tracker last)."""
    created = not os.path.exists(args.save)
    try:
        return convert_checkpoint(args.load, args.save, tp, pp, args.iteration, args.true_vocab_size,
                                  args.target_ckpt_format)
    except OSError as e:
        if isinstance(e, UserError):
            raise
        if created:
            shutil.rmtree(args.save, ignore_errors=True)
        where = f" ({e.filename})" if e.filename else ""
        raise UserError(f"cannot convert {args.load} to {args.save}: {e.strerror or e}{where}; no partial "
                        f"checkpoint was left in {args.save}") from None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    tp, pp = target_sizes(args)
    s = convert(args, tp, pp)
    source = s["source"] if isinstance(s["source"], str) else f"TP={s['source'][0]} PP={s['source'][1]}"
    if args.target_ckpt_format == "torch_dist":
        print(f"converted iteration {s['iteration']}: {source} -> torch_dist (any layout resumes it) in {args.save}")
        print(f"parameters: {s['parameters']:,}")
        if s["distrib_optim"] is not None:
            print(f"kept the optimizer's state ({', '.join(s['distrib_optim']['states'])}; step "
                  f"{s['distrib_optim']['step']}); RNG states restart on resume")
        return 0
    print(f"converted iteration {s['iteration']}: {source} -> TP={tp} PP={pp} ({s['files']} files) in {args.save}")
    print(f"parameters: {s['parameters']:,}")
    if s["imported"] is not None:
        print(f"read a {s['imported']['source']} checkpoint: parameter names mapped to ours, "
              f"{s['imported']['extra_states']} _extra_state entries dropped")
    old, new = s["vocab"]
    if s["true_vocab"] is None:
        print(f"padded vocabulary kept at {old} rows (tokenizer not found from the saved flags); a training run "
              f"at TP={tp} may pad to another size: pass --true-vocab-size to re-pad as it does")
    else:
        print(f"padded vocabulary: {old} -> {new} rows for TP={tp} (tokenizer: {s['true_vocab']} ids)")
    if s["distrib_optim"] is not None:
        print(f"kept the distributed optimizer's state: {DISTRIB_OPTIM} ({', '.join(s['distrib_optim']['states'])}; "
              f"step {s['distrib_optim']['step']}) re-split for TP={tp} PP={pp}, and its grad scaler and param groups")
    if s["dropped"]:
        print(f"dropped (layout-specific): {', '.join(s['dropped'])}; {s['resume_hint']}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
