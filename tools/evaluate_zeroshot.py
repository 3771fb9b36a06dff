"""Zero-shot (or few-shot) evaluation of a GPT checkpoint with lm-evaluation-harness 0.4.

    python tools/evaluate_zeroshot.py --load runs/gpt/checkpoints --tasks lambada_openai,piqa,hellaswag \
        [--num-fewshot 0] [--batch-size 16] [--include-path TASKS] [--limit 100] [--output-path results.json]
    torchrun --nproc-per-node 8 tools/evaluate_zeroshot.py ...   # data parallel: documents split by rank

Prints lm-eval's table and writes its JSON (rank 0 only). The checkpoint brings its own tokenizer and
model shape; evaluation always runs at full length (random-LTD is a training-only transformation).

Offline. Standard task names download their data from the Hugging Face Hub. Where the Hub cannot be
reached, tasks that are not under `--include-path` fail at once (before any model work) with a message
saying how to give them local data: `tools/make_local_tasks.py` writes override task files that read
local copies; a name lm-eval does not know at all is reported as unknown instead. To use a datasets
cache filled on a connected machine instead, set HF_DATASETS_OFFLINE=1.
"""

import argparse
import importlib.util
import json
import os
import re
import socket
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megatron.core.errors import UserError  # noqa: E402
from megatron.training.cli import ArgumentParser, run_cli  # noqa: E402

PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
LOCAL_DATA_HINT = ("point each at a local copy of its data: python tools/make_local_tasks.py --data-dir DATA "
                   "--output-dir TASKS --tasks {tasks}, then pass --include-path TASKS (docs/evaluation.md)")


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can this machine open a connection to the Hub? Behind a proxy we cannot tell cheaply: assume yes."""
    if _truthy("HF_HUB_OFFLINE"):
        return False
    if any(os.environ.get(v) for v in PROXY_VARS):
        return True
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    ok = []

    def probe():  # in a thread: name resolution itself can hang past any socket timeout
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 1.0)
    return bool(ok)


def offline_error(tasks) -> UserError:
    return UserError(f"task(s) {', '.join(tasks)} are not under --include-path and need the Hugging Face Hub, "
                     f"which this machine cannot reach; " + LOCAL_DATA_HINT.format(tasks=",".join(tasks)))


def builtin_words() -> set:
    """Every word in lm-eval's built-in task YAMLs: a superset of its task, group and tag names.

    A name outside it is certainly unknown to lm-eval. Scanning the text takes a fraction of a second,
    where TaskManager()'s real index parses the same ~14k files in about 10 s of CPU, too slow for a
    check whose point is to fail fast.
    """
    root = os.path.join(os.path.dirname(importlib.util.find_spec("lm_eval").origin), "tasks")
    words = set()
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith((".yaml", ".yml")):
                with open(os.path.join(folder, name), encoding="utf-8", errors="replace") as f:
                    words.update(re.findall(r"[\w.\-]+", f.read()))
    return words


def task_manager_for(tasks, include_path, hub_online: bool, use_cache: bool):
    """A TaskManager that knows every task; only local folders when they hold them all (no 10 s index)."""
    from lm_eval.tasks import TaskManager

    wanted = [t for t in tasks if not t.endswith((".yaml", ".yml"))]  # YAML paths load by themselves
    local = TaskManager(include_path=include_path, include_defaults=False)
    missing = [t for t in wanted if t not in local.all_tasks]
    if not missing:
        return local
    if not hub_online and not use_cache:
        known = builtin_words()
        unknown = [t for t in missing if t not in known]
        if unknown:
            raise UserError(f"unknown task(s) {', '.join(unknown)}: neither under --include-path nor lm-eval "
                            f"built-in task names; check the spelling (`lm_eval ls tasks` lists the names)")
        raise offline_error(missing)
    tm = TaskManager(include_path=include_path)
    unknown = [t for t in wanted if t not in tm.all_tasks]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; list the names with `lm_eval ls tasks`")
    return tm


def _limit(text: str):
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be > 0: a number of documents, or a fraction below 1")
    return int(value) if value >= 1 and value == int(value) else value


def results_path(output_path: str) -> str:
    """The JSON file `--output-path` names: the path itself, or results.json in an existing folder."""
    return os.path.join(output_path, "results.json") if os.path.isdir(output_path) else output_path


def check_writable(path: str) -> None:
    """UserError now, not after the evaluation, if `path` cannot be written (or its folder created)."""
    if os.path.exists(path):
        if not os.access(path, os.W_OK):
            raise UserError(f"--output-path {path} is not writable; pass another file or folder")
        return
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):  # the nearest existing ancestor must be a writable folder
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise UserError(f"--output-path {path}: {folder} is a file, not a folder; pass another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--output-path {path}: cannot write into {folder}; pass a path you can write to")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True, help="checkpoint folder (the --save folder) or one iter_XXXXXXX in it")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the latest)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names (or task YAML paths)")
    p.add_argument("--num-fewshot", type=int, default=None, help="examples in context (default: each task's, 0)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    p.add_argument("--include-path", action="append", default=None,
                   help="folder of extra or overriding task YAMLs (repeatable); see tools/make_local_tasks.py")
    p.add_argument("--limit", type=_limit, default=None, help="documents per task (or a fraction); for tests")
    p.add_argument("--output-path", default=None, help="write lm-eval's results JSON here")
    p.add_argument("--log-samples", action="store_true", help="keep every scored sample in the JSON")
    p.add_argument("--bootstrap-iters", type=int, default=1000,
                   help="bootstrap resamples for stderr of perplexity-like metrics (0: none)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling and global RNG seed")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="dtype to run the model in (log-softmax is always fp32)")
    p.add_argument("--distributed-backend", choices=("nccl", "gloo"), default=None)
    g = p.add_argument_group("tokenizer files, when they moved since training")
    g.add_argument("--vocab-file")
    g.add_argument("--merge-file")
    g.add_argument("--tokenizer-model")
    args = p.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not args.tasks:
        raise UserError("--tasks is empty; pass comma-separated lm-eval task names")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise UserError(f"--num-fewshot must be >= 0, got {args.num_fewshot}")
    for d in args.include_path or []:
        if not os.path.isdir(d):
            raise UserError(f"--include-path {d}: no such folder")
    if args.output_path:
        check_writable(results_path(args.output_path))
    return args


def evaluate(args, task_manager):
    """Run lm-eval on this rank; the results dict on rank 0, None elsewhere."""
    import torch
    from lm_eval import simple_evaluate

    from megatron.core import parallel_state
    from megatron.evaluation.checkpoint_model import load_gpt_checkpoint
    from megatron.evaluation.lm_eval_adapter import MegatronGPTLM

    device = parallel_state.init_distributed(args.distributed_backend)  # joins torchrun's group if any
    overrides = {"vocab_file": args.vocab_file, "merge_file": args.merge_file,
                 "tokenizer_model": args.tokenizer_model}
    gpt = load_gpt_checkpoint(args.load, args.iteration, device=device, dtype=getattr(torch, args.dtype),
                              tokenizer_overrides=overrides)
    lm = MegatronGPTLM(gpt.model, gpt.tokenizer, batch_size=args.batch_size)
    if lm.rank == 0:
        n = sum(p.numel() for p in gpt.model.parameters())
        print(f"evaluating {gpt.path} iteration {gpt.iteration} ({n:,} parameters) on "
              f"{', '.join(args.tasks)} with {lm.world_size} rank(s)", flush=True)
    try:
        return simple_evaluate(model=lm, tasks=args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                               task_manager=task_manager, bootstrap_iters=args.bootstrap_iters,
                               log_samples=args.log_samples, random_seed=args.seed, numpy_random_seed=args.seed,
                               torch_random_seed=args.seed, fewshot_random_seed=args.seed)
    except ConnectionError as e:  # also huggingface_hub's OfflineModeIsEnabled
        raise UserError(f"a task's data could not be fetched from the Hugging Face Hub "
                        f"({str(e).splitlines()[0][:160]}); " + LOCAL_DATA_HINT.format(tasks=",".join(args.tasks)))
    except FileNotFoundError as e:  # a task YAML naming a data file that is not there
        raise UserError(f"a task's data file is missing: {str(e).splitlines()[0][:200]}")


def report(results, output_path) -> None:
    from lm_eval.utils import handle_non_serializable, make_table

    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    if output_path:
        path = results_path(output_path)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")  # a reader never sees half
        try:
            with open(tmp, "w") as f:
                json.dump(results, f, indent=2, default=handle_non_serializable, ensure_ascii=False)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        print(f"wrote {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if importlib.util.find_spec("lm_eval") is None:
        raise UserError("lm-eval is not installed; install the eval extra: pip install -e '.[eval]'")
    start = time.time()
    use_cache = _truthy("HF_DATASETS_OFFLINE")  # the user's word that the datasets cache holds the data
    hub_online = hub_reachable()
    if not hub_online:  # before lm-eval imports huggingface_hub: no retries against an unreachable Hub
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    task_manager = task_manager_for(args.tasks, args.include_path, hub_online, use_cache)
    results = evaluate(args, task_manager)
    if results is not None:
        report(results, args.output_path)
        print(f"evaluation took {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
