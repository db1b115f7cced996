"""A corpus' token stream under one tokenizer: kept on disk, read on demand, a block at a time.

A harvest of N tokens tokenises only as far as its N tokens (plus a block), with a block of text
in memory at a time, whatever the corpus' size; the tokens go to ``<key>.i32`` (raw int32) and how
far the corpus was read to ``<key>.json``, so the next harvest of that corpus with that tokenizer,
a resumed one, or one after a restart reads them from disk instead of tokenising again.

The stream is the one a whole-corpus tokenisation gives: a text file is one document, a JSONL
line one document; a document is tokenised in blocks of ``LINES_PER_BLOCK`` lines (short inputs:
fast batch encoding, no model-max-length warnings), and when a corpus holds more than one
document each is followed by the separator token. The state file only ever points at a block
boundary, so a stream extended in steps, or after a crash, is the same stream.

Where each finished document's tokens lie (``[start, end)`` in the stream, separators outside)
goes to ``<key>.docs`` (int64 pairs), for harvests that pack one document per window. A text file
is one document, finished when the file is; until then its tokens so far are an open document.
"""

import codecs
import copy
import fcntl
import itertools
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cache_server.files import atomic_write

LINES_PER_BLOCK = 64
READ_BYTES = 1 << 20
"""Text read and encoded per batch call: big enough for the tokenizer's threads, small in memory."""


@dataclass
class _State:
    n_tokens: int = 0
    byte_offset: int = 0
    """Bytes of the corpus file tokenised: always at a block (text) or line (JSONL) boundary."""
    n_docs: int = 0
    """Finished documents: ``<key>.docs`` holds a start and an end for each."""
    complete: bool = False
    open_start: int | None = None
    """Where a document not yet finished starts (a text file's, until it is read to its end)."""


class CorpusTokens:
    """The token stream of one corpus file under one tokenizer (see the module)."""

    def __init__(self, data: Path, fmt: str, folder: Path, key: str, tokenizer, separator: int | None):
        self.data, self.fmt, self.tokenizer, self.separator = data, fmt, tokenizer, separator
        folder.mkdir(parents=True, exist_ok=True)
        self.path, self.state_path = folder / f"{key}.i32", folder / f"{key}.json"
        self.docs_path = folder / f"{key}.docs"
        self._lock_path = folder / f"{key}.lock"
        self._lock = threading.Lock()
        self._fast = self._backend()

    # -- reading ------------------------------------------------------------------------------
    def ensure(self, n: int | None, max_bytes: int | None = None) -> tuple[int, bool]:
        """Tokenise until ``n`` tokens are on disk (all of them when None), the corpus ends, or
        ``max_bytes`` more bytes of text were read. Returns (tokens on disk, whether that is all).
        The lock is taken a block at a time, so a reader of tokens already there never waits
        behind a long extension."""
        read = 0
        while True:
            with self._extending() as state:
                if state.complete or (n is not None and state.n_tokens >= n) or (max_bytes is not None and read >= max_bytes):
                    return state.n_tokens, state.complete
                used = self._extend(state, None if max_bytes is None else max(max_bytes - read, READ_BYTES))
                if not used:  # the next line is longer than max_bytes allows
                    return state.n_tokens, state.complete
                read += used

    def array(self, n: int) -> np.ndarray:
        """The first ``n`` tokens (at most what ``ensure`` put on disk), memory-mapped read-only."""
        if n <= 0:
            return np.zeros(0, dtype=np.int32)
        return np.memmap(self.path, dtype=np.int32, mode="r", shape=(n,))

    def documents(self) -> tuple[np.ndarray, int | None]:
        """(``[n, 2]`` start and end of each finished document on disk, the start of the open
        document, whose tokens run to the end of the stream so far; None when there is none)."""
        with self._lock:
            state = _State(**json.loads(self.state_path.read_bytes())) if self.state_path.exists() else _State()
        pairs = (np.fromfile(self.docs_path, dtype=np.int64, count=2 * state.n_docs).reshape(-1, 2)
                 if state.n_docs else np.zeros((0, 2), dtype=np.int64))
        return pairs, state.open_start

    # -- extending ----------------------------------------------------------------------------
    @contextmanager
    def _extending(self) -> Iterator[_State]:
        """This process' lock and a file lock (Ray workers share the folder), and the state on disk,
        the token file cut back to it (a crash between the two writes leaves extra tokens)."""
        with self._lock, self._lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            state = _State(**json.loads(self.state_path.read_bytes())) if self.state_path.exists() else _State()
            size = self.path.stat().st_size if self.path.exists() else 0
            docs_size = self.docs_path.stat().st_size if self.docs_path.exists() else 0
            if size < state.n_tokens * 4 or docs_size < state.n_docs * 16:  # lost: start again, not trust the state
                state = _State()
            for path, length in ((self.path, state.n_tokens * 4), (self.docs_path, state.n_docs * 16)):
                with path.open("ab") as f:
                    f.truncate(length)
            yield state

    def _extend(self, state: _State, limit: int | None = None) -> int:
        """Tokenise about ``READ_BYTES`` more of the corpus (a JSONL line longer than that whole, up
        to ``limit`` bytes), append, save the state; returns the bytes read (0: the line is longer
        than ``limit``, nothing read)."""
        size = READ_BYTES
        while True:
            with self.data.open("rb") as f:
                f.seek(state.byte_offset)
                raw = f.read(size)
                at_end = not f.read(1)
            pieces, used, docs = (self._text_blocks if self.fmt == "text" else self._jsonl_documents)(raw, at_end, state)
            if used or at_end:
                break
            if limit is not None and size >= limit:
                return 0
            size *= 2
        self._save(state, pieces, used, docs, at_end)
        return used

    def _save(self, state: _State, pieces: list, used: int, docs: list[tuple[int, int]], at_end: bool) -> None:
        """Append the pieces' tokens and the documents they finish (spans in the stream), then the
        state that says they are there."""
        tokens = np.fromiter(itertools.chain.from_iterable(pieces), dtype=np.int32)
        with self.path.open("ab") as f:  # no fsync: a lost tail is found by its size and read again
            f.write(tokens.tobytes())
        if docs:
            with self.docs_path.open("ab") as f:
                f.write(np.asarray(docs, dtype=np.int64).tobytes())
        state.n_tokens += len(tokens)
        state.byte_offset += used
        state.n_docs, state.complete = state.n_docs + len(docs), at_end
        atomic_write(self.state_path, json.dumps(asdict(state)).encode())

    def _encode(self, blocks: list[str]) -> list[list[int]]:
        if not blocks:
            return []
        if (backend := self._fast) is not None:
            ids = [enc.ids for enc in backend.encode_batch(blocks, add_special_tokens=False)]
        else:
            ids = self.tokenizer(blocks, add_special_tokens=False)["input_ids"]
        return ids

    def _backend(self):
        """The fast tokenizer, without the truncation or padding a model's tokenizer file may set
        (the MiniLM package's file cuts every input at 128 tokens and pads it): a corpus is text, whole."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None and (backend.truncation or backend.padding):
            backend = copy.deepcopy(backend)
            backend.no_truncation()
            backend.no_padding()
        return backend

    def _text_blocks(self, raw: bytes, at_end: bool, state: _State):
        """Whole blocks of lines of the one document; at the end, the rest too (and the document
        is finished)."""
        if at_end:
            lines = raw.decode("utf-8").splitlines(keepends=True)
        else:  # the last line may go on (or be a "\r" whose "\n" comes next): left for the next read
            prefix = _decode_prefix(raw)
            lines = prefix.splitlines(keepends=True)[:-1]
            # Fewer whole lines than a block: those lines; none: a cut in the long line, so a read
            # stays READ_BYTES whatever the text's shape (a corpus with no line breaks included).
            lines = lines[: len(lines) // LINES_PER_BLOCK * LINES_PER_BLOCK] or lines or [_cut(prefix)]
        blocks = ["".join(lines[i : i + LINES_PER_BLOCK]) for i in range(0, len(lines), LINES_PER_BLOCK)]
        used = len(raw) if at_end else sum(len(b.encode("utf-8")) for b in blocks)
        pieces = self._encode(blocks)
        state.open_start = None if at_end else 0
        return pieces, used, [(0, state.n_tokens + sum(map(len, pieces)))] if at_end else []

    def _jsonl_documents(self, raw: bytes, at_end: bool, state: _State):
        """Whole lines, each non-blank one a document; the separator goes before every document but
        the first, and after the last when there are several."""
        lines = raw.split(b"\n") if at_end else raw.split(b"\n")[:-1]
        used = len(raw) if at_end else sum(len(line) + 1 for line in lines)
        pieces, docs = self._documents([json.loads(line)["text"] for line in lines if line.strip()], state, at_end)
        return pieces, used, docs

    def _documents(self, texts: list[str], state: _State, at_end: bool) -> tuple[list, list[tuple[int, int]]]:
        """Documents' tokens, each in blocks of lines, the separator before every one but the
        corpus' first (and after its last, at the end, when there are several); and their spans."""
        spans, blocks = [], []
        for text in texts:
            doc = text.splitlines(keepends=True)
            first = len(blocks)
            blocks += ["".join(doc[i : i + LINES_PER_BLOCK]) for i in range(0, len(doc), LINES_PER_BLOCK)]
            spans.append((first, len(blocks)))
        encoded = self._encode(blocks)
        separator = [] if self.separator is None else [[self.separator]]
        pieces: list[list[int]] = []
        docs, at, n_docs = [], state.n_tokens, state.n_docs
        for first, stop in spans:
            if n_docs:
                pieces += separator
                at += len(separator)
            pieces += encoded[first:stop]
            length = sum(len(p) for p in encoded[first:stop])
            docs.append((at, at + length))
            at, n_docs = at + length, n_docs + 1
        if at_end and n_docs > 1:
            pieces += separator
        return pieces, docs


def _cut(text: str) -> str:
    """The longest prefix of a piece of one line that ends right before a whitespace run (where
    tokenizers split words anyway, so the tokens are those of the whole line); the whole piece
    when it has no such place (one 'word' longer than a read)."""
    last = re.search(r"\S\s+\S*\Z", text)
    return text[: last.start() + 1] if last else text


def _decode_prefix(raw: bytes) -> str:
    """The longest prefix of ``raw`` that is whole UTF-8 characters (a read may end mid-character)."""
    return codecs.getincrementaldecoder("utf-8")().decode(raw, final=False)


class PretokenizedTokens:
    """An uploaded ``.npy`` of token ids: the stream is the array, row after row, used as it is."""

    def __init__(self, data: Path):
        self.data = data

    def _ids(self) -> np.ndarray:
        return np.load(self.data, mmap_mode="r").reshape(-1)

    def ensure(self, n: int | None, max_bytes: int | None = None) -> tuple[int, bool]:
        return len(self._ids()), True

    def array(self, n: int) -> np.ndarray:
        return self._ids()[: max(n, 0)]

    def documents(self) -> tuple[np.ndarray, None]:
        """A 2-D array's rows are its documents; a 1-D array is one."""
        ids = np.load(self.data, mmap_mode="r")
        width = ids.shape[-1] if ids.ndim == 2 else ids.size
        starts = np.arange(0, ids.size, max(width, 1), dtype=np.int64)
        return np.stack([starts, starts + width], axis=1), None


def check_token_ids(path: Path, block: int = 1 << 24) -> tuple[int, int]:
    """(number of ids, largest id) of an uploaded ``.npy``, read a block at a time; ValueError
    saying what is wrong with one that is not a 1-D or 2-D array of non-negative int32/int64 ids."""
    try:
        ids = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # not an .npy, a truncated one, an object array
        raise ValueError(f"not a NumPy .npy array of token ids ({type(exc).__name__}: {exc})") from None
    if ids.dtype.kind not in "iu" or ids.dtype.itemsize not in (4, 8) or ids.ndim not in (1, 2):
        raise ValueError(f"token ids must be a 1-D or 2-D int32 or int64 array, not {ids.ndim}-D {ids.dtype}")
    if not ids.flags.c_contiguous:  # read row after row, it would be copied whole into memory on every read
        raise ValueError("the array is in Fortran (column-major) order: save np.ascontiguousarray(ids) instead")
    flat = ids.reshape(-1)
    if flat.size == 0:
        raise ValueError("the array holds no token ids")
    low = high = int(flat[0])
    for lo in range(0, flat.size, block):
        part = flat[lo : lo + block]
        low, high = min(low, int(part.min())), max(high, int(part.max()))
    if low < 0:
        raise ValueError(f"token ids must not be negative (found {low})")
    return flat.size, high
