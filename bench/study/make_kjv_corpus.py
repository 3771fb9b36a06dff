"""The study's corpus: the King James Bible (public domain) as one document per chapter, with a held-out
set of chapters for validation and the zero-shot tasks.

    python bench/study/make_kjv_corpus.py --text kjv.txt --output-dir DIR [--heldout-every 20]

`kjv.txt` is what Debian's `bible` program prints for "gen1:1-rev22:21" (`run_study.sh` fetches the
packages `bible-kjv` and `bible-kjv-text` with apt and unpacks them without installing). Writes

- `DIR/corpus.jsonl`: training chapters first, then the held-out ones, so `--split N_TRAIN,N_HELDOUT,0`
  makes the validation split exactly the held-out chapters (Megatron's split is a contiguous range);
- `DIR/heldout.jsonl`: the held-out chapters again, each with its verses, for `make_study_tasks.py`;
- `DIR/split.txt`: that `--split` value.

Every `--heldout-every`-th chapter (offset by half of it) is held out, so the held-out text samples every
part of the book rather than only its end. Verse numbers and chapter headings are dropped; a chapter's
verses are joined with single spaces.
"""

import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from megatron.core.errors import UserError  # noqa: E402
from megatron.training.cli import ArgumentParser, run_cli  # noqa: E402

HEADING = re.compile(r"^([1-3] )?[A-Z][A-Za-z ]+ \d+$")  # "Genesis 1", "1 Samuel 3", "Song of Solomon 2"
VERSE = re.compile(r"^ +(\d+) (.*)$")


def parse_chapters(lines):
    """[(heading, [verse text, ...]), ...] from `bible`'s output."""
    chapters, verses, heading, prev_blank = [], None, None, True
    for raw in lines:
        line = raw.rstrip("\n")
        if prev_blank and HEADING.match(line):
            if heading is not None:
                chapters.append((heading, verses))
            heading, verses = line, []
        elif VERSE.match(line) and verses is not None:
            verses.append(VERSE.match(line).group(2).strip())
        elif line.strip() and verses:
            verses[-1] += " " + line.strip()  # a verse's continuation line
        prev_blank = not line.strip()
    if heading is not None:
        chapters.append((heading, verses))
    return [(h, v) for h, v in chapters if v]


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--text", required=True, help="output of: bible -p DATA_DIR gen1:1-rev22:21")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--heldout-every", type=int, default=20)
    args = p.parse_args(argv)
    if not os.path.isfile(args.text):
        raise UserError(f"--text {args.text}: no such file")
    if args.heldout_every < 2:
        raise UserError("--heldout-every must be at least 2")
    with open(args.text, encoding="utf-8") as f:
        chapters = parse_chapters(f)
    if len(chapters) < 2 * args.heldout_every:
        raise UserError(f"{args.text}: found {len(chapters)} chapters; is it the output of `bible`?")
    offset = args.heldout_every // 2
    held = [c for i, c in enumerate(chapters) if i % args.heldout_every == offset]
    train = [c for i, c in enumerate(chapters) if i % args.heldout_every != offset]
    os.makedirs(args.output_dir, exist_ok=True)
    paths = {name: os.path.join(args.output_dir, name) for name in ("corpus.jsonl", "heldout.jsonl", "split.txt")}
    with open(paths["corpus.jsonl"] + ".tmp", "w") as f:
        for heading, verses in train + held:
            f.write(json.dumps({"text": " ".join(verses), "chapter": heading}) + "\n")
    with open(paths["heldout.jsonl"] + ".tmp", "w") as f:
        for heading, verses in held:
            f.write(json.dumps({"chapter": heading, "verses": verses}) + "\n")
    with open(paths["split.txt"] + ".tmp", "w") as f:
        f.write(f"{len(train)},{len(held)},0\n")
    for path in paths.values():
        os.replace(path + ".tmp", path)
    words = sum(len(" ".join(v).split()) for _, v in chapters)
    print(f"{len(chapters)} chapters ({words:,} words): {len(train)} for training, {len(held)} held out "
          f"-> {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
