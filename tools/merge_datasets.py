"""Concatenate every indexed dataset in a folder into one, as Megatron-LM's tools/merge_datasets.py does.

    python tools/merge_datasets.py --input shards/ --output-prefix data/corpus_text_document

Takes each prefix in `--input` that has both a `.bin` and an `.idx`, in sorted name order; all must
share one token dtype (the same tokenizer). The result's `.bin` is the inputs' `.bin` files back to
back and its document indices are re-offset, so document k of the second input follows the first's.
Written under temporary names and renamed at the end: a failed merge leaves no output behind.
"""

import argparse
import os
import sys
from pathlib import Path
from typing import List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megatron.core.datasets.indexed import IndexedDataset, IndexedDatasetBuilder  # noqa: E402
from megatron.core.errors import UserError  # noqa: E402
from megatron.training.cli import ArgumentParser  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])  # a bad flag is one `error:` line
    p.add_argument("--input", type=str, required=True, help="folder holding the .bin/.idx pairs to merge")
    p.add_argument("--output-prefix", type=str, required=True, help="writes {prefix}.bin and {prefix}.idx")
    p.add_argument("--multimodal", action="store_true", help="not supported (Megatron's multimodal index)")
    return p


def find_prefixes(folder: str) -> List[str]:
    """Sorted prefixes in `folder` with both files; a lone .bin or .idx is an error."""
    if not os.path.isdir(folder):
        raise UserError(f"--input {folder} is not a folder; pass the folder holding the .bin/.idx pairs")
    stems = {}
    for name in os.listdir(folder):
        stem, ext = os.path.splitext(name)
        if ext in (".bin", ".idx") and os.path.isfile(os.path.join(folder, name)):
            stems.setdefault(stem, set()).add(ext)
    for stem, exts in sorted(stems.items()):
        if len(exts) == 1:
            missing = ".idx" if ".bin" in exts else ".bin"
            raise UserError(f"{os.path.join(folder, stem)}{missing} is missing (its pair is there); "
                            "copy it too or move the lone file out of --input")
    if not stems:
        raise UserError(f"--input {folder} holds no .bin/.idx pairs; write them with tools/preprocess_data.py")
    return [os.path.join(folder, stem) for stem in sorted(stems)]


def merge(folder: str, output_prefix: str) -> dict:
    prefixes = find_prefixes(folder)
    out = os.path.realpath(output_prefix)
    if any(os.path.realpath(p) == out for p in prefixes):
        raise UserError(f"--output-prefix {output_prefix} is one of the inputs; write the merge elsewhere")
    out_dir = os.path.dirname(output_prefix)
    if out_dir and not os.path.isdir(out_dir):
        raise UserError(f"--output-prefix {output_prefix}: folder {out_dir} does not exist; create it first")
    dtype = IndexedDataset(prefixes[0]).dtype
    try:
        builder = IndexedDatasetBuilder(output_prefix + ".bin", dtype)
    except OSError as e:
        raise UserError(f"cannot write {output_prefix}.bin ({e.strerror}); pick a writable --output-prefix")
    with builder:
        for prefix in prefixes:
            builder.add_index(prefix)
        builder.finalize(output_prefix + ".idx")
    merged = IndexedDataset(output_prefix)
    return {"inputs": len(prefixes), "documents": merged.num_documents, "sequences": len(merged),
            "dtype": dtype.name}


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.multimodal:
            raise UserError("--multimodal indexes are not supported; merge text datasets only")
        stats = merge(args.input, args.output_prefix)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_prefix}.bin/.idx: {stats['inputs']} inputs, {stats['documents']} documents, "
          f"{stats['sequences']} sequences ({stats['dtype']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
