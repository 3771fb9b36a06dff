"""Write a JSONL sample corpus (`{"text": ...}`, one document per line) from text shipped with Python.

Why: tests, demos and tokenizer training need real English offline, and the interpreter itself carries
some: the help topics of `pydoc_data.topics` and the docstrings of the standard library. Nothing is
downloaded, and the corpus is identical run to run on the same Python build: a fixed module list, members
in sorted order, duplicate texts dropped, texts with memory addresses skipped, and the walk done in a fresh
`python -I -S` child, so neither site-packages nor whatever the caller imported can change it (importing
torch replaces `inspect.getfile`; pytest replaces `sys.unraisablehook`).

Documents: one per help topic; then for each module in `MODULES` (those that import), its module
docstring, one per public function, and one per public class (class docstring followed by its methods').
They are written in a fixed shuffled order (seed 0): Megatron's `--split` cuts contiguous ranges, and in
walk order the validation split would be the last few modules only, a different distribution from the
training text.

    python tools/make_sample_corpus.py --output data/sample.jsonl [--max-docs N]
"""

import importlib
import inspect
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import warnings

_CHILD = "--emit-documents"  # internal: the fresh interpreter that walks the modules; stdlib only

# Modules with prose docstrings; chosen by hand, so the corpus does not change with what happens to be
# importable. Modules that open windows or print on import (antigravity, this, turtle, idlelib) are out.
MODULES = (
    "abc argparse array ast asyncio.base_events asyncio.events asyncio.futures asyncio.locks "
    "asyncio.queues asyncio.streams asyncio.subprocess asyncio.tasks base64 bdb binascii bisect builtins "
    "bz2 calendar cmath cmd code codecs codeop collections collections.abc colorsys compileall "
    "concurrent.futures._base concurrent.futures.process concurrent.futures.thread configparser contextlib "
    "contextvars copy copyreg csv ctypes dataclasses datetime dbm decimal difflib dis doctest "
    "email.charset email.contentmanager email.encoders email.errors email.feedparser email.generator "
    "email.header email.headerregistry email.message email.mime.base email.parser email.policy "
    "email.utils enum errno faulthandler filecmp fileinput fnmatch fractions ftplib functools gc getopt "
    "getpass gettext glob graphlib gzip hashlib heapq hmac html html.parser http http.client "
    "http.cookiejar http.cookies http.server imaplib importlib importlib.abc importlib.machinery "
    "importlib.metadata importlib.resources importlib.util inspect io ipaddress itertools json "
    "json.decoder json.encoder keyword linecache locale logging logging.config logging.handlers lzma "
    "mailbox marshal math mimetypes mmap modulefinder multiprocessing.connection multiprocessing.context "
    "multiprocessing.managers multiprocessing.pool multiprocessing.process multiprocessing.queues "
    "multiprocessing.shared_memory multiprocessing.synchronize netrc numbers operator optparse os "
    "pathlib pdb pickle pickletools pkgutil platform plistlib poplib posixpath pprint profile pstats "
    "pty py_compile pyclbr pydoc queue quopri random re reprlib rlcompleter runpy sched secrets select "
    "selectors shelve shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics string "
    "stringprep struct subprocess symtable sys sysconfig tabnanny tarfile tempfile textwrap threading "
    "time timeit token tokenize tomllib trace traceback tracemalloc types typing unicodedata unittest "
    "unittest.case unittest.loader unittest.mock unittest.result unittest.runner unittest.suite "
    "urllib.error urllib.parse urllib.request urllib.response urllib.robotparser uuid warnings wave "
    "weakref wsgiref.handlers wsgiref.headers wsgiref.simple_server wsgiref.util wsgiref.validate "
    "xml.dom.minidom xml.dom.pulldom xml.etree.ElementTree xml.sax xml.sax.handler xml.sax.saxutils "
    "xml.sax.xmlreader xmlrpc.client xmlrpc.server zipapp zipfile zipimport zlib zoneinfo "
    # pure-Python twins and internals with long prose docstrings
    "_collections_abc _pydecimal _pyio _threading_local asyncio.protocols asyncio.runners "
    "asyncio.selector_events asyncio.staggered asyncio.timeouts asyncio.transports asyncio.unix_events "
    "curses.textpad dbm.dumb email._header_value_parser email._policybase email.base64mime "
    "email.quoprimime encodings encodings.punycode lib2to3.fixer_base lib2to3.pytree lib2to3.refactor "
    "multiprocessing.reduction tkinter tkinter.filedialog tkinter.simpledialog tkinter.ttk venv xml.dom "
    "xml.dom.domreg xml.dom.expatbuilder"
).split()

MIN_CHARS = 40  # shorter docstrings ("Return self." ...) are noise
_ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")  # e.g. a dataclass default's repr: differs run to run


def _doc(obj) -> str:
    """`obj`'s own docstring, cleaned; "" if it has none (inherited docstrings would repeat)."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _is_routine(obj) -> bool:
    return inspect.isroutine(obj) or isinstance(obj, (property, classmethod, staticmethod))


def _module_docs(name: str):
    """Yield the documents of module `name`, or nothing if it does not import here."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = importlib.import_module(name)
    except Exception:  # not built on this platform (e.g. no _ssl, no _sqlite3): skip it
        return
    yield f"Module {name}\n\n{_doc(module)}"
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue  # private, or imported from elsewhere (documented there)
        if isinstance(obj, type):
            parts = [f"class {name}.{attr}\n\n{_doc(obj)}"]
            for meth, m in sorted(vars(obj).items()):
                if _is_routine(m) and not meth.startswith("_") and len(_doc(m)) >= MIN_CHARS:
                    parts.append(f"{attr}.{meth}\n\n{_doc(m)}")
            yield "\n\n".join(parts)
        elif _is_routine(obj):
            yield f"{name}.{attr}\n\n{_doc(obj)}"


def iter_documents():
    """All documents, in the fixed order, deduplicated. Meant for the fresh child interpreter only."""
    from pydoc_data.topics import topics

    seen = set()
    candidates = (topics[k].strip() for k in sorted(topics))
    modules = (doc for name in MODULES for doc in _module_docs(name))
    for text in (*candidates, *modules):
        body = text.split("\n\n", 1)[-1]
        if len(body) < MIN_CHARS or _ADDRESS.search(text) or text in seen:
            continue
        seen.add(text)
        yield text


def _emit_documents():
    """Child side: write each document as one JSONL line (UTF-8) to stdout."""
    for text in iter_documents():
        sys.stdout.buffer.write((json.dumps({"text": text}, ensure_ascii=False) + "\n").encode("utf-8"))


def corpus_lines() -> list:
    """Parent side: the corpus as JSONL lines (bytes), walked by a fresh `python -I -S` of this file."""
    proc = subprocess.run([sys.executable, "-I", "-S", os.path.abspath(__file__), _CHILD],
                          capture_output=True, check=False)
    assert proc.returncode == 0, f"corpus walker failed: {proc.stderr.decode(errors='replace')[-2000:]}"
    return proc.stdout.splitlines(keepends=True)


def write_corpus(output: str, max_docs=None) -> tuple:
    """Write the corpus atomically (temp file in the same folder, then rename); return (documents, bytes)."""
    lines = corpus_lines()
    random.Random(0).shuffle(lines)  # see the module docstring: i.i.d. train/valid/test splits
    lines = lines[:max_docs]
    folder = os.path.dirname(os.path.abspath(output))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".sample-corpus-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.writelines(lines)
        os.replace(tmp, output)
    except BaseException:
        os.unlink(tmp)
        raise
    return len(lines), os.path.getsize(output)


def main(argv=None) -> int:
    # Not at the top: the child walker runs without site-packages and must not see the checkout.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
    from megatron.core.errors import UserError
    from megatron.training.cli import ArgumentParser

    parser = ArgumentParser(description=__doc__.split("\n\n")[0])  # a bad flag is one `error:` line
    parser.add_argument("--output", required=True, help="JSONL file to write")
    parser.add_argument("--max-docs", type=int, default=None, help="keep the first N documents of the shuffled corpus")
    try:
        args = parser.parse_args(argv)
        folder = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(folder):
            raise UserError(f"--output {args.output}: folder {folder} does not exist; create it first")
        if os.path.isdir(args.output):
            raise UserError(f"--output {args.output} is a folder; pass a file path such as "
                            f"{os.path.join(args.output, 'sample.jsonl')}")
        if args.max_docs is not None and args.max_docs < 1:
            raise UserError(f"--max-docs must be >= 1, got {args.max_docs}")
        n, size = write_corpus(args.output, args.max_docs)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}: {n} documents, {size / 1e6:.2f} MB (Python {sys.version.split()[0]})")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == [_CHILD]:
        _emit_documents()
    else:
        sys.exit(main())
