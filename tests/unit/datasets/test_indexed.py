"""The .bin/.idx format: exact bytes of the reference's worked example, both directions against
megatron-core's own writer and reader, atomic writes, and one-line errors for broken files."""

import json
import pickle
import struct

import numpy as np
import pytest

from megatron.core.datasets.indexed import DType, IndexedDataset, IndexedDatasetBuilder, optimal_dtype
from megatron.core.errors import UserError
from tests.megatron_core_oracle import run_oracle

# The worked example of docs/reference (2 documents of 3 and 5 uint16 tokens), byte by byte.
WORKED_IDX = bytes.fromhex(
    "4d4d49444944580000"  # magic
    "0100000000000000"  # version 1
    "08"  # dtype uint16
    "0200000000000000"  # S = 2
    "0300000000000000"  # D = 3
    "03000000" "05000000"  # lengths
    "0000000000000000" "0600000000000000"  # byte pointers
    "0000000000000000" "0100000000000000" "0200000000000000"  # document indices
)


def write(prefix, docs, dtype=np.uint16):
    """docs: list of documents, each a list of sequences (lists of ids)."""
    with IndexedDatasetBuilder(f"{prefix}.bin", dtype) as b:
        for doc in docs:
            for seq in doc:
                b.add_item(np.array(seq))
            b.end_document()
        b.finalize(f"{prefix}.idx")
    return str(prefix)


def test_worked_example_exact_bytes(tmp_path):
    p = tmp_path / "ex"
    with IndexedDatasetBuilder(f"{p}.bin", np.uint16) as b:
        b.add_document([10, 11, 12], [3])
        b.add_document([20, 21, 22, 23, 24], [5])
        b.finalize(f"{p}.idx")
    assert len(WORKED_IDX) == 82
    assert (tmp_path / "ex.idx").read_bytes() == WORKED_IDX
    assert (tmp_path / "ex.bin").read_bytes() == np.array([10, 11, 12, 20, 21, 22, 23, 24], "<u2").tobytes()
    ds = IndexedDataset(str(p))
    assert len(ds) == 2 and ds.num_documents == 2 and ds.dtype == np.uint16
    assert ds[1].tolist() == [20, 21, 22, 23, 24]
    assert ds.get(1, offset=1, length=3).tolist() == [21, 22, 23]
    assert ds.get(0, offset=2).tolist() == [12]
    assert ds.sequence_pointers.tolist() == [0, 6]
    assert ds.document_indices.tolist() == [0, 1, 2]



def test_add_documents_writes_the_same_bytes_in_one_call(tmp_path):
    """The batch path preprocess_data.py uses: the worked example's bytes, and add_item per sequence's bytes
    for documents with several sequences, empty documents and an empty call."""
    p = tmp_path / "ex"
    with IndexedDatasetBuilder(f"{p}.bin", np.uint16) as b:
        b.add_documents(np.array([10, 11, 12, 20, 21, 22, 23, 24]), [3, 5], [1, 1])
        b.finalize(f"{p}.idx")
    assert (tmp_path / "ex.idx").read_bytes() == WORKED_IDX
    assert (tmp_path / "ex.bin").read_bytes() == np.array([10, 11, 12, 20, 21, 22, 23, 24], "<u2").tobytes()

    docs = [[[1, 2, 3]], [], [[4], [5, 6, 7]], [], [[65535, 0]]]  # documents of sequences
    write(tmp_path / "ref", docs)
    with IndexedDatasetBuilder(f"{tmp_path}/new.bin", np.uint16) as b:
        for part in (docs[:2], [], docs[2:]):  # two chunks and an empty one
            seqs = [s for d in part for s in d]
            b.add_documents(np.array([t for s in seqs for t in s], np.uint16), [len(s) for s in seqs],
                            [len(d) for d in part])
        b.finalize(f"{tmp_path}/new.idx")
    for ext in ("bin", "idx"):
        assert (tmp_path / f"new.{ext}").read_bytes() == (tmp_path / f"ref.{ext}").read_bytes()

def test_dtype_codes_and_optimal_dtype():
    codes = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64", 7: "float32", 8: "uint16"}
    for code, name in codes.items():
        assert DType(code).numpy == np.dtype(name) and DType.from_numpy(name) == code
    assert optimal_dtype(50257) == np.uint16  # GPT-2
    assert optimal_dtype(65499) == np.uint16
    assert optimal_dtype(65500) == np.int32
    assert optimal_dtype(None) == np.int32


def test_round_trip_sequences_documents_and_empty_documents(tmp_path):
    docs = [[[1, 2], [3]], [], [[4, 5, 6]], [[7]], []]
    ds = IndexedDataset(write(tmp_path / "d", docs, np.int32))
    assert len(ds) == 4 and ds.num_documents == 5
    assert ds.document_indices.tolist() == [0, 2, 2, 3, 4, 4]
    assert ds.sequence_lengths.tolist() == [2, 1, 3, 1]
    assert ds.sequence_pointers.tolist() == [0, 8, 12, 24]
    assert [x.tolist() for x in ds[0:4]] == [[1, 2], [3], [4, 5, 6], [7]]
    assert ds[-1].tolist() == [7]
    with pytest.raises(IndexError):
        ds[4]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.prefix == ds.prefix and clone[2].tolist() == [4, 5, 6]


def test_empty_dataset_reads(tmp_path):
    ds = IndexedDataset(write(tmp_path / "e", [[]]))
    assert len(ds) == 0 and ds.num_documents == 1


def test_add_index_reoffsets_documents_and_concatenates_tokens(tmp_path):
    a = write(tmp_path / "a", [[[1, 2]], [[3]]])
    b = write(tmp_path / "b", [[], [[4, 5], [6]]])
    with IndexedDatasetBuilder(f"{tmp_path}/m.bin", np.uint16) as m:
        m.add_index(a)
        m.add_index(b)
        m.finalize(f"{tmp_path}/m.idx")
    ds = IndexedDataset(f"{tmp_path}/m")
    assert ds.document_indices.tolist() == [0, 1, 2, 2, 4]
    assert [x.tolist() for x in ds[:]] == [[1, 2], [3], [4, 5], [6]]
    assert (tmp_path / "m.bin").read_bytes() == (tmp_path / "a.bin").read_bytes() + (tmp_path / "b.bin").read_bytes()
    write(tmp_path / "c", [[[1]]], np.int32)
    with IndexedDatasetBuilder(f"{tmp_path}/n.bin", np.uint16) as m, pytest.raises(UserError, match="same tokenizer"):
        m.add_index(f"{tmp_path}/c")


def test_writes_are_atomic_and_cancelled_on_error(tmp_path):
    b = IndexedDatasetBuilder(f"{tmp_path}/x.bin", np.uint16)
    b.add_document([1, 2], [2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin.tmp"]  # nothing under the real names yet
    b.finalize(f"{tmp_path}/x.idx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x.idx"]

    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(f"{tmp_path}/y.bin", np.uint16) as b:
            b.add_document([1, 2], [2])
            raise RuntimeError("tokenizer crashed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin", "x.idx"]


# -- broken files: one clear line naming the file ---------------------------------------------------
def _broken(tmp_path, mutate):
    p = write(tmp_path / "bad", [[[1, 2, 3]], [[4, 5]]])
    mutate(tmp_path / "bad.idx", tmp_path / "bad.bin")
    return p


def _patch(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "mutate, pattern",
    [
        (lambda i, b: i.unlink(), r"bad\.idx not found"),
        (lambda i, b: b.unlink(), r"bad\.bin not found"),
        (lambda i, b: _patch(i, 0, b"NOTANIDX!"), r"bad\.idx is not a Megatron \.idx file"),
        (lambda i, b: _patch(i, 9, struct.pack("<Q", 2)), r"bad\.idx has index version 2"),
        (lambda i, b: _patch(i, 17, b"\x09"), r"bad\.idx has unknown dtype code 9"),
        (lambda i, b: i.write_bytes(i.read_bytes()[:20]), r"bad\.idx is truncated"),
        (lambda i, b: i.write_bytes(i.read_bytes()[:-1]), r"bad\.idx is truncated"),
        (lambda i, b: b.write_bytes(b.read_bytes()[:-2]), r"bad\.bin is shorter than .*bad\.idx says"),
    ],
)
def test_broken_files_raise_one_line_user_errors(tmp_path, mutate, pattern):
    prefix = _broken(tmp_path, mutate)
    with pytest.raises(UserError, match=pattern) as e:
        IndexedDataset(prefix)
    assert "\n" not in str(e.value)


def test_prefix_given_with_extension_gets_a_hint(tmp_path):
    p = write(tmp_path / "d", [[[1]]])
    with pytest.raises(UserError, match="without the extension"):
        IndexedDataset(p + ".bin")


# -- megatron-core, both directions -----------------------------------------------------------------
CASES = {
    "u16": ("uint16", [[[1, 2, 3]], [[4, 5, 6, 7, 8]], [], [[9], [10, 11]]]),
    "i32": ("int32", [[[70000, 1]], [[2**31 - 1]], [[0, 0, 0]]]),
    "u8": ("uint8", [[[255, 0]], []]),
}

ORACLE_SCRIPT = r"""
import json, sys, numpy, torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
cases = json.load(open("cases.json"))
out = {}
for name, (dtype, docs) in cases.items():
    ds = IndexedDataset("ours_" + name)  # megatron-core reads our files
    out[name] = {
        "dtype": numpy.dtype(ds.index.dtype).name,
        "lengths": ds.sequence_lengths.tolist(),
        "pointers": ds.index.sequence_pointers.tolist(),
        "documents": ds.document_indices.tolist(),
        "tokens": [ds[i].tolist() for i in range(len(ds))],
    }
    b = IndexedDatasetBuilder("theirs_" + name + ".bin", dtype=getattr(numpy, dtype))  # and writes its own
    for doc in docs:
        for seq in doc:
            b.add_item(torch.tensor(seq, dtype=torch.int64))
        b.end_document()
    b.finalize("theirs_" + name + ".idx")
b = IndexedDatasetBuilder("theirs_merged.bin", dtype=numpy.uint16)
b.add_index("theirs_u16")
b.add_index("theirs_u16")
b.finalize("theirs_merged.idx")
print(json.dumps(out))
"""


def test_megatron_core_reads_ours_and_we_read_theirs_byte_identical(tmp_path):
    for name, (dtype, docs) in CASES.items():
        write(tmp_path / f"ours_{name}", docs, np.dtype(dtype))
    (tmp_path / "cases.json").write_text(json.dumps(CASES))
    theirs_view = run_oracle(ORACLE_SCRIPT, cwd=tmp_path)

    for name, (dtype, docs) in CASES.items():
        seqs = [seq for doc in docs for seq in doc]
        ends = np.cumsum([0] + [len(doc) for doc in docs]).tolist()
        view = theirs_view[name]
        assert view["dtype"] == dtype
        assert view["tokens"] == seqs and view["lengths"] == [len(s) for s in seqs]
        assert view["documents"] == ends
        nbytes = [len(s) * np.dtype(dtype).itemsize for s in seqs]
        assert view["pointers"] == np.cumsum([0] + nbytes[:-1]).tolist()  # exclusive cumsum of bytes
        for ext in ("bin", "idx"):  # same content -> same bytes
            assert (tmp_path / f"ours_{name}.{ext}").read_bytes() == (tmp_path / f"theirs_{name}.{ext}").read_bytes()
        ours = IndexedDataset(str(tmp_path / f"theirs_{name}"))  # we read megatron-core's files
        assert [x.tolist() for x in ours[:]] == seqs and ours.document_indices.tolist() == ends

    with IndexedDatasetBuilder(f"{tmp_path}/ours_merged.bin", np.uint16) as m:
        m.add_index(str(tmp_path / "ours_u16"))
        m.add_index(str(tmp_path / "ours_u16"))
        m.finalize(f"{tmp_path}/ours_merged.idx")
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours_merged.{ext}").read_bytes() == (tmp_path / f"theirs_merged.{ext}").read_bytes()
