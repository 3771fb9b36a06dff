"""Zero-shot tasks for the study, made from held-out chapters (none of their text is trained on).

    python bench/study/make_study_tasks.py --heldout DIR/heldout.jsonl --output-dir TASKS

- `kjv_lastword` (LAMBADA-style, lm-eval `loglikelihood`): a passage of three consecutive verses with its last
  word removed; the model must predict that word. Metrics: `acc` (the word is the greedy continuation) and
  `perplexity` of the word.
- `kjv_pages` (lm-eval `loglikelihood_rolling`): every held-out chapter scored whole. Metrics:
  `word_perplexity`, `byte_perplexity`, `bits_per_byte`; independent of the tokenizer's granularity.

Writes `TASKS/<task>.jsonl` and `TASKS/<task>.yaml` (absolute data paths: lm-eval resolves them against
the working directory), ready for `tools/evaluate_zeroshot.py --include-path TASKS --tasks kjv_lastword,kjv_pages`.
"""

import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

from megatron.core.errors import UserError  # noqa: E402
from megatron.training.cli import ArgumentParser, run_cli  # noqa: E402

WORD_AT_END = re.compile(r"^(.*\S)\s+([A-Za-z]{3,})[^A-Za-z]*$")  # the passage, then its last word

YAMLS = {
    "kjv_lastword": """task: kjv_lastword
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{' ' + target}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "kjv_pages": """task: kjv_pages
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{page}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""",
}


def lastword_docs(chapters):
    docs = []
    for ch in chapters:
        verses = ch["verses"]
        for i in range(0, len(verses) - 2, 3):
            m = WORD_AT_END.match(" ".join(verses[i:i + 3]))
            if m:
                docs.append({"context": m.group(1), "target": m.group(2), "chapter": ch["chapter"]})
    return docs


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--heldout", required=True, help="heldout.jsonl written by make_kjv_corpus.py")
    p.add_argument("--output-dir", required=True)
    args = p.parse_args(argv)
    if not os.path.isfile(args.heldout):
        raise UserError(f"--heldout {args.heldout}: no such file; run bench/study/make_kjv_corpus.py first")
    with open(args.heldout) as f:
        chapters = [json.loads(line) for line in f if line.strip()]
    docs = {"kjv_lastword": lastword_docs(chapters),
            "kjv_pages": [{"page": " ".join(ch["verses"]), "chapter": ch["chapter"]} for ch in chapters]}
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    for task, rows in docs.items():
        data = os.path.join(out, f"{task}.jsonl")
        with open(data, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        with open(os.path.join(out, f"{task}.yaml"), "w") as f:
            f.write(YAMLS[task].format(data=data))
        print(f"{task}: {len(rows)} documents -> {data}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
