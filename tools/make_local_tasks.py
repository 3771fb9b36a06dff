"""Point lm-eval's standard tasks at local copies of their data, for machines without the Hugging Face Hub.

    python tools/make_local_tasks.py --data-dir DATA --output-dir TASKS        # the GPT-3 zero-shot set
    python tools/make_local_tasks.py --data-dir DATA --output-dir TASKS --tasks piqa,lambada_openai
    python tools/make_local_tasks.py --list                                    # which files each task reads
    python tools/evaluate_zeroshot.py --load CKPT --tasks piqa,lambada_openai --include-path TASKS

DATA holds one folder per task and one file per split, named after the split lm-eval's task reads, with
the Hub dataset's own fields (the prompts index them): `DATA/piqa/validation.jsonl`,
`DATA/lambada_openai/test.jsonl`, `DATA/anli_r1/test_r1.jsonl`, ... (`.jsonl`, `.json`, `.parquet` or
`.csv`). On a machine with internet, `--download` writes exactly these files from the Hub.

Each `TASKS/<task>.yaml` includes lm-eval's own task file, so prompt, choices, preprocessing and metrics
stay lm-eval's, and replaces only where the data comes from (absolute paths: lm-eval resolves data
files against the working directory). It keeps the standard task name, so it overrides the built-in one
and results are keyed exactly as in a connected run. Split files that are missing are switched off
(a missing training split only matters for few-shot); a missing evaluation split skips the task.

Few-shot without a training split. lm-eval then draws the examples from the evaluated documents, and
leaves the current document out only when `fewshot_split == test_split` (0.4.13, `fewshot_context`):
true for a task evaluating `validation` with no fewshot split (None == None), false for one evaluating
`test`. So an override whose examples would come from its test split sets `fewshot_split` to it.
"""

import os
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megatron.core.errors import UserError  # noqa: E402
from megatron.training.cli import ArgumentParser, run_cli  # noqa: E402

# The 19 zero-shot tasks of the random-LTD paper (GPT-3's set) in lm-eval 0.4: task -> (its YAML under
# lm_eval/tasks, the Hub dataset and config it reads). Other task names are looked up in lm-eval's index.
GPT3_TASKS = {
    "hellaswag": ("hellaswag/hellaswag.yaml", "Rowan/hellaswag", None),
    "lambada_openai": ("lambada/lambada_openai.yaml", "EleutherAI/lambada_openai", "default"),
    "triviaqa": ("triviaqa/default.yaml", "mandarjoshi/trivia_qa", "rc.nocontext"),
    "webqs": ("webqs/webqs.yaml", "stanfordnlp/web_questions", None),
    "winogrande": ("winogrande/default.yaml", "allenai/winogrande", "winogrande_xl"),
    "piqa": ("piqa/piqa.yaml", "baber/piqa", None),
    "arc_challenge": ("arc/arc_challenge.yaml", "allenai/ai2_arc", "ARC-Challenge"),
    "arc_easy": ("arc/arc_easy.yaml", "allenai/ai2_arc", "ARC-Easy"),
    "anli_r1": ("anli/anli_r1.yaml", "facebook/anli", None),
    "anli_r2": ("anli/anli_r2.yaml", "facebook/anli", None),
    "anli_r3": ("anli/anli_r3.yaml", "facebook/anli", None),
    "openbookqa": ("openbookqa/openbookqa.yaml", "allenai/openbookqa", "main"),
    "race": ("race/race.yaml", "EleutherAI/race", "high"),
    "boolq": ("super_glue/boolq/default.yaml", "aps/super_glue", "boolq"),
    "copa": ("super_glue/copa/default.yaml", "aps/super_glue", "copa"),
    "sglue_rte": ("super_glue/rte/default.yaml", "aps/super_glue", "rte"),
    "wsc": ("super_glue/wsc/default.yaml", "aps/super_glue", "wsc.fixed"),
    "multirc": ("super_glue/multirc/default.yaml", "aps/super_glue", "multirc"),
    "record": ("super_glue/record/default.yaml", "aps/super_glue", "record"),
}
SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs without importing their `!function` code (kept as text)."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def read_task_yaml(path: Path) -> dict:
    """A task YAML with its `include:` files merged in (the including file wins), as lm-eval reads it."""
    with open(path) as f:
        cfg = yaml.load(f, Loader=_TaskYamlLoader) or {}
    includes = cfg.pop("include", None) or []
    merged = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        merged.update(read_task_yaml(path.parent / inc))
    merged.update(cfg)
    return merged


def hub_source(task: str) -> str:
    _, path, name = GPT3_TASKS.get(task, (None, None, None))
    return "its Hub dataset" if path is None else f"Hub dataset {path}" + (f" ({name})" if name else "")


def builtin_yaml(task: str) -> Path:
    """The lm-eval YAML that defines `task` (the table above, else lm-eval's task index: slower)."""
    try:
        import lm_eval.tasks
    except ImportError:
        raise UserError("lm-eval is not installed; install the eval extra: pip install -e '.[eval]'")
    root = Path(lm_eval.tasks.__file__).parent
    if task in GPT3_TASKS and (root / GPT3_TASKS[task][0]).is_file():
        return root / GPT3_TASKS[task][0]
    entry = lm_eval.tasks.TaskManager().task_index.get(task)
    if entry is None or getattr(entry, "yaml_path", None) is None:
        raise UserError(f"lm-eval has no task named {task!r}; see `lm_eval ls tasks` for the names")
    return Path(entry.yaml_path)


def task_splits(cfg: dict) -> dict:
    """{split key: split name} the task declares, and the split it evaluates (test, else validation)."""
    splits = {k: cfg[k] for k in SPLIT_KEYS if cfg.get(k)}
    return splits, splits.get("test_split") or splits.get("validation_split")


def find_split_file(data_dir: Path, task: str, split: str):
    for ext in FORMATS:
        path = data_dir / task / f"{split}{ext}"
        if path.is_file():
            return path
    return None


def override_config(task: str, data_dir: Path) -> dict:
    """The override task config for `task` reading `data_dir/task/*`; UserError without its eval split."""
    source = builtin_yaml(task)
    builtin = read_task_yaml(source)
    splits, eval_split = task_splits(builtin)
    if eval_split is None:
        raise UserError(f"task {task} declares no test or validation split; it cannot be redirected")
    files = {name: find_split_file(data_dir, task, name) for name in set(splits.values())}
    if files[eval_split] is None:
        raise UserError(f"no data for {task}: expected {data_dir / task / eval_split}.jsonl "
                        f"(the {eval_split!r} split of {hub_source(task)})")
    formats = {FORMATS[p.suffix] for p in files.values() if p is not None}
    if len(formats) > 1:
        raise UserError(f"{data_dir / task} mixes file formats {sorted(formats)}; use one format per task")
    cfg = {"include": str(source), "task": task, "dataset_path": formats.pop(), "dataset_name": None,
           "dataset_kwargs": {"data_files": {n: str(p.resolve()) for n, p in files.items() if p is not None}}}
    for key, name in splits.items():
        cfg[key] = name if files[name] is not None else None
    pool = cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split") or \
        (builtin.get("fewshot_config") or {}).get("samples")  # fixed examples: not drawn from the docs
    if pool is None and cfg.get("test_split") == eval_split:  # examples from the test docs: exclude each one
        cfg["fewshot_split"] = eval_split
    return cfg


def write_tasks(tasks, data_dir: str, output_dir: str):
    """Write `<output_dir>/<task>.yaml` for each task with data; return (written, skipped messages)."""
    os.makedirs(output_dir, exist_ok=True)
    written, skipped = [], []
    for task in tasks:
        try:
            cfg = override_config(task, Path(data_dir).resolve())
        except UserError as e:
            skipped.append(str(e))
            continue
        path = os.path.join(output_dir, f"{task}.yaml")
        with open(path, "w") as f:
            f.write(f"# Written by tools/make_local_tasks.py: lm-eval's {task} reading local files.\n")
            yaml.safe_dump(cfg, f, sort_keys=False)
        written.append(path)
    return written, skipped


def download(tasks, data_dir: str) -> None:
    """On a connected machine: save each task's Hub splits as DATA/<task>/<split>.jsonl."""
    import datasets

    for task in tasks:
        cfg = read_task_yaml(builtin_yaml(task))
        splits, _ = task_splits(cfg)
        for split in sorted(set(splits.values())):
            out = Path(data_dir) / task / f"{split}.jsonl"
            out.parent.mkdir(parents=True, exist_ok=True)
            ds = datasets.load_dataset(cfg["dataset_path"], cfg.get("dataset_name"), split=split,
                                       **(cfg.get("dataset_kwargs") or {}))
            ds.to_json(str(out), lines=True)
            print(f"wrote {out} ({len(ds)} rows)")


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="folder with DATA/<task>/<split>.jsonl files")
    parser.add_argument("--output-dir", help="folder to write the override task YAMLs into (--include-path)")
    parser.add_argument("--tasks", default=",".join(GPT3_TASKS),
                        help="comma-separated lm-eval task names (default: the 19 GPT-3 zero-shot tasks)")
    parser.add_argument("--list", action="store_true", help="print the files each task reads, and exit")
    parser.add_argument("--download", action="store_true",
                        help="(needs internet) save the tasks' Hub data into --data-dir first")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise UserError("--tasks is empty; pass comma-separated lm-eval task names")
    if args.list:
        for task in tasks:
            splits, eval_split = task_splits(read_task_yaml(builtin_yaml(task)))
            print(f"{task}: evaluates {eval_split!r}; files <data-dir>/{task}/"
                  f"{{{','.join(sorted(set(splits.values())))}}}.jsonl (from {hub_source(task)})")
        return 0
    if not args.data_dir or not args.output_dir:
        raise UserError("pass --data-dir DATA and --output-dir TASKS (or --list)")
    if args.download:
        download(tasks, args.data_dir)
    if not os.path.isdir(args.data_dir):
        raise UserError(f"--data-dir {args.data_dir}: no such folder (see --list for the files expected)")
    written, skipped = write_tasks(tasks, args.data_dir, args.output_dir)
    for message in skipped:
        print(f"skipped: {message}", file=sys.stderr)
    if not written:
        raise UserError(f"no task had its data under {args.data_dir}; see --list for the files expected")
    print(f"wrote {len(written)} task file(s) to {args.output_dir}: "
          f"{', '.join(Path(p).stem for p in written)}")
    print(f"evaluate with: --tasks {','.join(Path(p).stem for p in written)} --include-path {args.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
