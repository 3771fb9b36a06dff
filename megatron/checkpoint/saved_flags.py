"""A checkpoint's model and tokenizer flags, read back as command-line flags (Megatron's
`--use-checkpoint-args`, and what examples/finetune_gpt2_ltd.sh passes on).

    root, iteration, (tp, pp), flags = checkpoint_flags("runs/gpt2_imported")
    flags.model      ["--num-layers", "12", "--hidden-size", "768", ..., "--openai-gelu"]
    flags.tokenizer  ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "<root>/tokenizer"]

Works for our checkpoints, Hugging Face imports and Megatron-LM checkpoints (whose args are mapped to our
names, or refused, by `megatron_lm.import_checkpoint`). Only one rank's file is opened, memory-mapped, so
nothing but the args is read. Relative tokenizer paths are resolved as `tokenizer.py` resolves them (as
given, else beside the checkpoint).

    python -m megatron.checkpoint.saved_flags DIR    prints CKPT_* shell assignments (the recipe's use)
"""

import shlex
import sys
from dataclasses import dataclass
from typing import List, Tuple

from megatron.checkpoint import megatron_lm, protocol, torch_dist
from megatron.checkpoint.model_args import MODEL_FLAGS, POSITION_FLAGS
from megatron.checkpoint.reader import resolve_checkpoint
from megatron.checkpoint.tokenizer import TOKENIZER_FLAGS, _find_file
from megatron.core.errors import UserError


@dataclass(frozen=True)
class SavedFlags:
    model: List[str]
    tokenizer: List[str]
    model_type: str  # "gpt", or "bert" (whose entry point is pretrain_bert_ltd.py)


def _as_flags(args: dict, keys) -> List[str]:
    """store_true flags as themselves, values after their flag; None/False: not given."""
    out = []
    for k in keys:
        v = args.get(k)
        if v is None or v is False:
            continue
        out.append("--" + k.replace("_", "-"))
        if v is not True:
            out.append(str(v))
    return out


def checkpoint_flags(load: str) -> Tuple[str, int, Tuple[int, int], SavedFlags]:
    """(root, iteration, (tp, pp), flags) of the checkpoint `--load` would resume."""
    root, iteration = resolve_checkpoint(load)
    folder = protocol.committed_dir(root, iteration)
    if torch_dist.is_torch_dist(folder):  # common.json holds the args and the saving layout
        common = torch_dist.read_common(folder)
        args = dict(common.get("args") or {})
        layout = common.get("layout") or {}
        tp, pp = layout.get("tensor_model_parallel_size") or 1, layout.get("pipeline_model_parallel_size") or 1
    else:
        tp, pp = protocol.saved_layout(root, iteration) or (1, 1)
        path = protocol.committed_file(root, iteration, 0, 0 if pp > 1 else None)  # one rank's file holds the args
        args = dict(megatron_lm.import_checkpoint(protocol.torch_load(path, mmap=True), path).get("args") or {})
    if not args:
        raise UserError(f"{root} iteration {iteration} records no training args; it was not written by a trainer")
    model = [k for k in MODEL_FLAGS if not k.endswith("vocab_size") and k != "bert_binary_head"]
    model += [*POSITION_FLAGS.get(args.get("position_embedding_type"), ()), "make_vocab_size_divisible_by"]
    if args.get("group_query_attention"):
        model.append("num_query_groups")
    for k in ("vocab_file", "merge_file", "tokenizer_model"):  # relative names: as given, else beside the checkpoint
        args[k] = _find_file(args.get(k), root)
    kind = "bert" if args.get("model_type") == "bert" else "gpt"
    return root, iteration, (tp, pp), SavedFlags(_as_flags(args, model), _as_flags(args, TOKENIZER_FLAGS), kind)


def main(argv=None) -> int:
    """Print the CKPT_* shell assignments; a user error is one `error:` line and exit 2 (this package does
    not import megatron.training, whose run_cli does the same for the entry points)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) != 1:
            raise UserError("usage: python -m megatron.checkpoint.saved_flags CHECKPOINT_DIR")
        root, iteration, (tp, pp), flags = checkpoint_flags(argv[0])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"CKPT_ROOT={shlex.quote(root)} CKPT_ITERATION={iteration} CKPT_TP={tp} CKPT_PP={pp} "
          f"CKPT_MODEL_TYPE={flags.model_type}")
    print(f"CKPT_MODEL_ARGS={shlex.quote(shlex.join(flags.model))}")
    print(f"CKPT_TOKENIZER_ARGS={shlex.quote(shlex.join(flags.tokenizer))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
