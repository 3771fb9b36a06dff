"""The reproduction study's helpers (bench/study/): chapters parsed from `bible`'s output, the held-out split
put last, the zero-shot documents, and the held-out loss against a direct computation."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron.core.datasets.indexed import IndexedDatasetBuilder
from tests.scripts import load_script

BIBLE = """
Genesis 1

  1 In the beginning God created the heaven and the earth.
  2 And the earth was without form, and void; and darkness was upon the face of
the deep. And the Spirit of God moved upon the face of the waters.
  3 And God said, Let there be light: and there was light.

1 Samuel 3

  1 And the child Samuel ministered unto the LORD before Eli.
  2 And it came to pass at that time, when Eli was laid down in his place,
  3 And ere the lamp of God went out in the temple of the LORD, where the ark of God was, and Samuel was laid
down to sleep;

Song of Solomon 2

  1 I am the rose of Sharon, and the lily of the valleys.
"""


def test_chapters_verses_and_continuation_lines():
    corpus = load_script("bench/study/make_kjv_corpus.py")
    chapters = corpus.parse_chapters(BIBLE.splitlines(keepends=True))
    assert [h for h, _ in chapters] == ["Genesis 1", "1 Samuel 3", "Song of Solomon 2"]
    assert len(chapters[0][1]) == 3 and chapters[0][1][1].endswith("upon the face of the deep. And the Spirit of "
                                                                   "God moved upon the face of the waters.")
    assert chapters[1][1][2].endswith("where the ark of God was, and Samuel was laid down to sleep;")


def test_held_out_chapters_come_last_and_the_split_selects_them(tmp_path):
    corpus = load_script("bench/study/make_kjv_corpus.py")
    text = "".join(f"\nBook {i}\n\n  1 Verse one of chapter {i}.\n  2 Verse two of chapter {i}.\n" for i in range(1, 41))
    (tmp_path / "kjv.txt").write_text(text)
    assert corpus.main(["--text", str(tmp_path / "kjv.txt"), "--output-dir", str(tmp_path), "--heldout-every", "10"]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "corpus.jsonl")]
    held = [json.loads(line) for line in open(tmp_path / "heldout.jsonl")]
    assert open(tmp_path / "split.txt").read().strip() == "36,4,0"
    assert [r["chapter"] for r in rows[36:]] == [h["chapter"] for h in held] == ["Book 6", "Book 16", "Book 26",
                                                                                 "Book 36"]
    assert not {r["chapter"] for r in rows[:36]} & {h["chapter"] for h in held}


def test_last_word_documents_end_where_the_target_begins():
    tasks = load_script("bench/study/make_study_tasks.py")
    chapters = [{"chapter": "X 1", "verses": ["And he said,", "Go in peace.", "And they went unto the mountain.",
                                             "4", "5", "6:"]}]
    docs = tasks.lastword_docs(chapters)  # the second group ends in "6:", which has no word to predict
    assert docs == [{"context": "And he said, Go in peace. And they went unto the", "target": "mountain",
                     "chapter": "X 1"}]


def test_heldout_loss_is_the_mean_next_token_loss_over_the_held_out_stream(tmp_path):
    study = load_script("bench/study/heldout_loss.py")
    prefix = str(tmp_path / "d")
    docs = [np.arange(1, 8), np.arange(10, 30), np.arange(30, 41)]  # the last two are "held out"
    with IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16) as b:
        for d in docs:
            b.add_item(d)
            b.end_document()
        b.finalize(prefix + ".idx")
    windows = study.heldout_windows(prefix, 1, 8)  # 31 tokens -> 3 windows of 9, overlapping by one
    stream = torch.arange(10, 41)
    assert torch.equal(windows, torch.stack([stream[0:9], stream[8:17], stream[16:25]]))

    torch.manual_seed(0)
    table = torch.randn(64, 64)
    model = lambda tokens: table[tokens]  # noqa: E731  "logits" [b, s, V] straight from the token id
    expect = F.cross_entropy(table[windows[:, :-1]].flatten(0, 1), windows[:, 1:].flatten())
    assert study.heldout_loss(model, windows, batch_size=2) == pytest.approx(expect.item(), rel=1e-6)
