"""Megatron's indexed dataset: token ids in `P.bin`, where each sequence starts in `P.idx`.

A dataset is a path prefix P (no extension). Files are byte-compatible with Megatron-LM's
`megatron/core/datasets/indexed_dataset.py`, so data preprocessed by either project loads in the other.

`P.idx`, little-endian, no padding (header = struct "<9sQBQQ", 34 bytes):

    offset        size  field
    0             9     magic b"MMIDIDX\\x00\\x00"
    9             8     version <Q, always 1
    17            1     dtype code <B (DType below)
    18            8     S = sequence count <Q
    26            8     D = document count <Q = len(document_indices) = documents + 1
    34            4*S   sequence_lengths, int32, tokens per sequence
    34+4S         8*S   sequence_pointers, int64, BYTE offset of each sequence in P.bin (0, += len*itemsize)
    34+12S        8*D   document_indices, int64 [0, end of doc 0, end of doc 1, ...]; last = S
   (34+12S+8D     S     sequence_modes, int8, multimodal data only; ignored here)

Document d is sequences [document_indices[d], document_indices[d+1]); an empty document is two equal
consecutive entries. GPT data has one sequence per document, BERT data (--split-sentences) one per
sentence.

`P.bin` is the token arrays concatenated in write order: no header, no separators (an EOD token is there
only if preprocessing appended one).

Worked example (2 documents of 3 and 5 tokens, uint16): P.bin is 16 bytes, P.idx 82 bytes =
34 header + 2*4 lengths [3, 5] + 2*8 pointers [0, 6] + 3*8 document_indices [0, 1, 2].
"""

import array
import contextlib
import enum
import hashlib
import json
import os
import struct
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from megatron.core.errors import UserError

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D
assert _HEADER.size == 34


class DType(enum.IntEnum):
    """The dtype codes stored in byte 17 of `.idx`."""

    uint8 = 1
    int8 = 2
    int16 = 3
    int32 = 4
    int64 = 5
    float64 = 6
    float32 = 7
    uint16 = 8

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(self.name)

    @classmethod
    def from_numpy(cls, dtype) -> "DType":
        return cls[np.dtype(dtype).name]


def optimal_dtype(vocab_size: Optional[int]) -> np.dtype:
    """Smallest token dtype Megatron picks for a vocabulary: uint16 below 65500 ids, else int32."""
    if vocab_size is not None and vocab_size < 65500:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def idx_path(prefix: str) -> str:
    return prefix + ".idx"


def bin_path(prefix: str) -> str:
    return prefix + ".bin"


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class IndexedDatasetBuilder:
    """Writes one `.bin`/`.idx` pair, atomically.

    Tokens go to `<bin_path>.tmp` as they come; `finalize(idx_path)` writes `<idx_path>.tmp`, then renames
    the `.bin` and the `.idx` into place (the `.idx` last: a reader never sees a new index next to a
    half-written `.bin`). `cancel()` removes the temporaries; using the builder as a context manager
    cancels on any exit that did not finalize, so a failed run leaves no partial files behind.

        with IndexedDatasetBuilder("out.bin", np.uint16) as b:
            b.add_document([1, 2, 3], [3])
            b.finalize("out.idx")
    """

    def __init__(self, bin_path: str, dtype=np.int32) -> None:
        self.bin_path = bin_path
        self.dtype = np.dtype(dtype)
        self._code = DType.from_numpy(self.dtype)  # KeyError here = a dtype Megatron cannot store
        self._bin_tmp = bin_path + ".tmp"
        self._idx_tmp: Optional[str] = None
        self._file = open(self._bin_tmp, "wb")
        self._lengths = array.array("i")  # int32, one per sequence
        self._doc_indices = array.array("q", [0])  # int64, starts [0]
        self._done = False

    # -- writing -----------------------------------------------------------------------------------
    def _as_tokens(self, tokens) -> np.ndarray:
        a = np.asarray(tokens)
        if self.dtype.kind in "iu" and a.size:
            info = np.iinfo(self.dtype)
            assert info.min <= a.min() and a.max() <= info.max, (
                f"token ids [{a.min()}, {a.max()}] do not fit {self.dtype} in {self.bin_path}"
            )
        return np.ascontiguousarray(a, dtype=self.dtype).reshape(-1)

    def add_item(self, tokens) -> None:
        """Append one sequence (a list, numpy array or CPU tensor of token ids)."""
        a = self._as_tokens(tokens)
        self._file.write(a.tobytes())
        self._lengths.append(a.size)

    def end_document(self) -> None:
        """Close the current document: the sequences added since the last call form one document."""
        self._doc_indices.append(len(self._lengths))

    def add_document(self, tokens, lengths: Sequence[int]) -> None:
        """Append one document of `sum(lengths)` tokens split into sequences of `lengths`."""
        a = self._as_tokens(tokens)
        assert a.size == sum(lengths), f"{a.size} tokens but lengths sum to {sum(lengths)}"
        self._file.write(a.tobytes())
        self._lengths.extend(int(n) for n in lengths)
        self._doc_indices.append(len(self._lengths))

    def add_documents(self, tokens, lengths, sequences_per_document) -> None:
        """Append many documents in one write: the same bytes as `add_document` once per document.

        `tokens` is every sequence concatenated, `lengths` the length of each sequence, and
        `sequences_per_document` how many of those sequences each document has (0: an empty document).
        """
        a = self._as_tokens(tokens)  # [sum(lengths)]
        lengths = np.ascontiguousarray(lengths, dtype=np.int32).reshape(-1)  # [S_new]
        counts = np.asarray(sequences_per_document, dtype=np.int64).reshape(-1)  # [D_new]
        assert a.size == int(lengths.sum(dtype=np.int64)), f"{a.size} tokens but lengths sum to {lengths.sum()}"
        assert lengths.size == int(counts.sum()), f"{lengths.size} sequences but documents hold {counts.sum()}"
        self._file.write(memoryview(a).cast("B"))  # no copy; one write per call
        ends = len(self._lengths) + np.cumsum(counts)  # [D_new] new entries of document_indices
        self._lengths.frombytes(lengths.tobytes())
        self._doc_indices.frombytes(ends.astype(np.int64).tobytes())

    def add_index(self, prefix: str) -> None:
        """Append every document of the dataset at `prefix` (same dtype), e.g. to merge shards."""
        src = IndexedDataset(prefix)
        if src.dtype != self.dtype:
            raise UserError(
                f"cannot merge {prefix}: its tokens are {src.dtype}, the output's are {self.dtype}; "
                "preprocess all parts with the same tokenizer"
            )
        offset = len(self._lengths)
        self._lengths.frombytes(np.ascontiguousarray(src.sequence_lengths, np.int32).tobytes())
        docs = np.asarray(src.document_indices[1:], dtype=np.int64) + offset
        self._doc_indices.frombytes(docs.tobytes())
        # Copy exactly the bytes the index covers (the pointers of the merged file are recomputed).
        nbytes = int(np.sum(src.sequence_lengths, dtype=np.int64)) * self.dtype.itemsize
        with open(bin_path(prefix), "rb") as f:
            while nbytes > 0:
                chunk = f.read(min(nbytes, 1 << 24))
                assert chunk, f"{bin_path(prefix)} ended early"
                self._file.write(chunk)
                nbytes -= len(chunk)
        del src

    # -- committing --------------------------------------------------------------------------------
    def finalize(self, idx_path: str) -> None:
        """Write the index, then move both files into place."""
        assert not self._done, "finalize() or cancel() was already called"
        self._file.close()
        self._idx_tmp = idx_path + ".tmp"
        lengths = np.array(self._lengths, dtype=np.int32)  # [S]
        docs = np.array(self._doc_indices, dtype=np.int64)  # [D]
        assert docs[-1] == lengths.size, "sequences added after the last end_document()"
        pointers = np.zeros(lengths.size, dtype=np.int64)  # byte offsets: exclusive cumsum
        if lengths.size > 1:
            np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        with open(self._idx_tmp, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, _VERSION, int(self._code), lengths.size, docs.size))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(docs.tobytes())
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, idx_path)
        self._done = True

    def cancel(self) -> None:
        """Drop everything written so far; no file stays behind."""
        if self._done:
            return
        self._file.close()
        _remove_quietly(self._bin_tmp)
        if self._idx_tmp:
            _remove_quietly(self._idx_tmp)
        self._done = True

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()  # no-op after finalize()


class IndexedDataset:
    """Memory-mapped reader of a `.bin`/`.idx` pair.

    `ds[i]` / `ds.get(i, offset, length)` return read-only numpy views of sequence i; nothing is read
    until asked. Pickles as its prefix (DataLoader workers re-open the files).
    """

    def __init__(self, prefix: str) -> None:
        self._open(prefix)

    def _open(self, prefix: str) -> None:
        self.prefix = prefix
        ipath, bpath = idx_path(prefix), bin_path(prefix)
        for path in (ipath, bpath):
            if not os.path.isfile(path):
                hint = ""
                if prefix.endswith((".bin", ".idx")):
                    hint = f" (give the prefix without the extension: {prefix[:-4]})"
                raise UserError(
                    f"{path} not found for data prefix {prefix}{hint}; "
                    "write the pair with tools/preprocess_data.py"
                )
        regen = "regenerate it with tools/preprocess_data.py"
        size = os.path.getsize(ipath)
        if size < _HEADER.size:
            raise UserError(f"{ipath} is truncated ({size} bytes, the header alone is 34); {regen}")
        with open(ipath, "rb") as f:
            magic, version, code, n_seq, n_doc = _HEADER.unpack(f.read(_HEADER.size))
        if magic != _MAGIC:
            raise UserError(f"{ipath} is not a Megatron .idx file (magic {magic!r}); {regen}")
        if version != _VERSION:
            raise UserError(f"{ipath} has index version {version}, only version 1 is supported; {regen}")
        try:
            self.dtype = DType(code).numpy
        except ValueError:
            raise UserError(f"{ipath} has unknown dtype code {code} (known: 1-8); the file is corrupt, {regen}")
        need = _HEADER.size + 12 * n_seq + 8 * n_doc
        if size < need:
            raise UserError(
                f"{ipath} is truncated ({size} bytes, its header announces {need}); {regen}"
            )

        buf = np.memmap(ipath, mode="r")  # uint8 view of the whole index
        o = _HEADER.size
        self.sequence_lengths = np.frombuffer(buf, np.int32, count=n_seq, offset=o)  # [S]
        self.sequence_pointers = np.frombuffer(buf, np.int64, count=n_seq, offset=o + 4 * n_seq)  # [S]
        self.document_indices = np.frombuffer(buf, np.int64, count=n_doc, offset=o + 12 * n_seq)  # [D]
        if n_doc == 0 or self.document_indices[0] != 0 or self.document_indices[-1] != n_seq:
            raise UserError(f"{ipath} has inconsistent document indices (corrupt file); {regen}")

        itemsize = self.dtype.itemsize
        need_bin = 0
        if n_seq:
            need_bin = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize
        bin_size = os.path.getsize(bpath)
        if bin_size != need_bin:  # the .bin is exactly the tokens the index points at, nothing more
            raise UserError(
                f"{bpath} is {'shorter' if bin_size < need_bin else 'longer'} than {ipath} says ({bin_size} "
                f"bytes, {ipath} describes {need_bin}); the two files come from different runs or a copy was "
                "cut short: copy or regenerate both"
            )
        # numpy cannot map an empty file; an empty dataset reads from an empty buffer instead.
        self._bin = np.memmap(bpath, mode="r") if bin_size else np.zeros(0, np.uint8)

    # -- reading -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.sequence_lengths.shape[0]

    @property
    def num_documents(self) -> int:
        return self.document_indices.shape[0] - 1

    def get(self, i: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens `[offset, offset + length)` of sequence i (to its end when length is None)."""
        n = int(self.sequence_lengths[i])
        if length is None:
            length = n - offset
        assert 0 <= offset and 0 <= length and offset + length <= n, (
            f"read [{offset}, {offset + length}) of sequence {i} of length {n} in {self.prefix}"
        )
        start = int(self.sequence_pointers[i]) + offset * self.dtype.itemsize
        return np.frombuffer(self._bin, self.dtype, count=length, offset=start)

    def __getitem__(self, i: Union[int, slice]) -> Union[np.ndarray, List[np.ndarray]]:
        if isinstance(i, slice):
            return [self.get(j) for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {len(self)} sequences in {self.prefix}")
        return self.get(i)

    # -- pickling: re-open from the prefix ---------------------------------------------------------
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self._open(state["prefix"])

    @staticmethod
    def exists(prefix: str) -> bool:
        return os.path.isfile(idx_path(prefix)) and os.path.isfile(bin_path(prefix))


# -- start-up check: token ids within the vocabulary --------------------------------------------------
# A full scan of a large .bin costs one sequential read (seconds per GB), too slow to repeat at every
# start. It runs once per file version: (min, max) is cached as JSON in the dataset index cache, keyed
# by the size, mtime and inode of both files, so a rewritten or replaced file is scanned again. Only a
# range that passes the check is cached: a start-up that fails on bad ids leaves no file (nor folder).
# Ranks that start together lock the dataset's .idx, so one scans and the others read its result.
_SCAN_CHUNK = 1 << 26  # tokens per numpy reduction


def _file_key(prefix: str) -> list:
    return [[st.st_size, st.st_mtime_ns, st.st_ino] for st in (os.stat(idx_path(prefix)), os.stat(bin_path(prefix)))]


@contextlib.contextmanager
def _file_lock(path: str):
    """flock on an existing file (read-only is enough, nothing is created); where the file system cannot
    lock, every process scans for itself."""
    fd = None
    try:
        fd = os.open(path, os.O_RDONLY)
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)
    except (OSError, ImportError):
        pass
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _read_cached(path: Optional[str], key: list) -> Optional[Tuple[int, int]]:
    try:
        with open(path) as f:
            d = json.load(f)
        return (int(d["min"]), int(d["max"])) if d.get("key") == key else None
    except (OSError, TypeError, ValueError, KeyError):
        return None


def scan_token_range(ds: IndexedDataset) -> Tuple[int, int]:
    """(min, max) token id of the whole .bin; (0, -1) when it holds no tokens."""
    tokens = np.frombuffer(ds._bin, ds.dtype, count=len(ds._bin) // ds.dtype.itemsize)
    lo, hi = 0, -1
    for start in range(0, tokens.size, _SCAN_CHUNK):
        chunk = tokens[start : start + _SCAN_CHUNK]
        hi = max(hi, int(chunk.max()))
        if ds.dtype.kind != "u":
            lo = min(lo, int(chunk.min()))
    return lo, hi


def token_range(ds: IndexedDataset, cache_dir: Optional[str],
                accept: Optional[Callable[[int, int], bool]] = None) -> Tuple[int, int]:
    """scan_token_range, cached in `cache_dir` (None: scan every time). A freshly scanned range that
    `accept(lo, hi)` rejects is returned but not cached, so the failing caller leaves nothing on disk."""
    name = hashlib.md5(os.path.abspath(ds.prefix).encode("utf-8")).hexdigest() + "-token_range.json"
    path = os.path.join(cache_dir, name) if cache_dir else None
    key = _file_key(ds.prefix)
    found = _read_cached(path, key) if path else None
    if found:
        return found
    with _file_lock(idx_path(ds.prefix)):
        found = _read_cached(path, key) if path else None  # another rank may have scanned meanwhile
        if found:
            return found
        lo, hi = scan_token_range(ds)
        if path and (accept is None or accept(lo, hi)):
            try:
                os.makedirs(cache_dir, exist_ok=True)
                tmp = f"{path}.{os.getpid()}.tmp"
                with open(tmp, "w") as f:
                    json.dump({"prefix": os.path.abspath(ds.prefix), "key": key, "min": lo, "max": hi}, f)
                os.replace(tmp, path)
            except OSError:
                pass  # an unwritable cache only costs a scan next time
    return lo, hi


def check_token_ids(ds: IndexedDataset, vocab_size: Optional[int], cache_dir: Optional[str]) -> None:
    """UserError at start-up when any token id of `ds` lies outside [0, vocab_size); the scanned range is
    cached only when it fits, so the failed start writes nothing into the data folder."""
    if vocab_size is None:
        return
    if ds.dtype.kind == "u" and np.iinfo(ds.dtype).max < vocab_size:
        return  # every id the dtype can hold is in the vocabulary

    def fits(lo: int, hi: int) -> bool:
        return lo >= 0 and hi < vocab_size

    lo, hi = token_range(ds, cache_dir, accept=fits)
    if not fits(lo, hi):
        raise UserError(
            f"token id {hi if hi >= vocab_size else lo} in {bin_path(ds.prefix)} is outside this tokenizer's vocab "
            f"of {vocab_size}: the data was probably preprocessed with another tokenizer; re-run "
            "tools/preprocess_data.py with the tokenizer flags of this run"
        )
