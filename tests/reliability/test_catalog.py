"""docs/RELIABILITY.md's catalog: every row names a test that pytest collects, down to the parametrized
case it cites (`test[case]`), so a renamed test or a dropped case fails here."""

import os
import re
import subprocess
import sys

from tests.functional.gpt_cli import REPO

ROW = re.compile(r"^\| (\d+) \|")
# `path::name`, `path::name[case]`, or `…[case]` / `[case]` (a case of the test named before it);
# a case ending in "…" is the start of a longer id
REF = re.compile(r"^(?:(?P<path>(?:rel|unit|functional|distributed)/[\w/]+\.py)::(?P<name>\w+))?…?"
                 r"(?:\[(?P<case>[^\]]+)\])?$")


def catalog_rows() -> list:
    with open(os.path.join(REPO, "docs/RELIABILITY.md")) as f:
        catalog = f.read().split("\n## Catalog\n")[1].split("\n## ")[0]
    return [line for line in catalog.splitlines() if ROW.match(line)]


def cited_ids(rows) -> list:
    """(row number, node id or id prefix + "…") for every test a row cites; "same test" rows cite the
    test of the row above."""
    cited, current = [], None
    for row in rows:
        number, cell = int(ROW.match(row).group(1)), row.rstrip().rstrip("|").rsplit(" | ", 1)[1]
        refs = re.findall(r"`([^`]+)`", cell)
        assert refs or "same test" in cell, f"row {number} cites no test: {cell}"
        if not refs:
            cited.append((number, current))
        for ref in refs:
            m = REF.match(ref)
            assert m and (m.group("path") or m.group("case")), f"row {number}: cannot read {ref!r}"
            if m.group("path"):
                current = f"tests/{m.group('path').replace('rel/', 'reliability/', 1)}::{m.group('name')}"
            assert current, f"row {number}: a case before any test"
            case = m.group("case")
            cited.append((number, current if case is None else f"{current}[{case}]"))
    return cited


def collected_ids(files) -> set:
    """Node ids as pytest collects them (parametrized ids included), in a child process."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-o", "addopts=", "-p",
                           "no:cacheprovider", *sorted(files)], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {line.strip() for line in proc.stdout.splitlines() if "::" in line}


def exists(ref: str, ids: set) -> bool:
    if ref.endswith("…]"):  # a case cited by the start of its id
        return any(i.startswith(ref[:-2]) for i in ids)
    return ref in ids or any(i.startswith(ref + "[") for i in ids)  # a test cited without its case


def test_every_catalog_row_names_a_collected_test_and_case():
    rows = catalog_rows()
    assert [int(ROW.match(r).group(1)) for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 25
    cited = cited_ids(rows)
    ids = collected_ids({ref.split("::")[0] for _, ref in cited})
    missing = [f"row {number}: {ref}" for number, ref in cited if not exists(ref, ids)]
    assert missing == []


def test_the_check_rejects_what_it_should():
    """The parser against rows written for it: a wrong case and a wrong name are caught."""
    ids = {"tests/reliability/test_x.py::test_a[one-1]", "tests/reliability/test_x.py::test_b"}
    rows = ["| 1 | a | b | c | `rel/test_x.py::test_a[one…]` |", "| 2 | a | b | c | `…[two]` |",
            "| 3 | a | b | c | same test |", "| 4 | a | b | c | `rel/test_x.py::test_b`, `rel/test_x.py::test_c` |"]
    cited = cited_ids(rows)
    assert [(n, exists(ref, ids)) for n, ref in cited] == [(1, True), (2, False), (3, True), (4, True), (4, False)]
