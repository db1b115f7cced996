"""Corpora: text to harvest from. Uploaded files are stored under their content hash.

A text file is one document; a JSONL file holds one ``{"text": ...}`` document per line. A
corpus' tokens under a tokenizer are kept on disk beside it, read as far as harvests asked
(``corpus_tokens``), never held in memory whole.
"""

import codecs
import gzip
import hashlib
import json
import os
import tempfile
import threading
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import numpy as np

from cache_server.corpora.tokens import CorpusTokens, PretokenizedTokens, check_token_ids
from cache_server.corpora.hf_datasets import DatasetTokens, check_column, corpus_id_of, locate
from cache_server.errors import ServiceError
from cache_server.files import atomic_write
from cache_server.quarantine import Quarantine
from shared.ids import bytes_id, is_valid_id
from shared.schemas import CorpusInfo, DatasetRef

DEFAULT_NAME = "default"
MAX_JSONL_LINE = 16 << 20
"""Characters in one JSONL line (one document): a line is parsed whole, at upload and by the harvest."""
_BUILTIN_FILE = "tiny_shakespeare.txt.gz"


class CorpusError(ServiceError):
    """A bad corpus reference or upload."""


def _builtin_text() -> bytes:
    return gzip.decompress(resources.files("cache_server").joinpath("data", _BUILTIN_FILE).read_bytes())


def check_vocabulary(corpus: CorpusInfo, label: str, model: str, vocabulary: int) -> None:
    """Refuse (422) a pre-tokenized corpus holding ids the model's vocabulary does not have."""
    if corpus.max_token_id is not None and corpus.max_token_id >= vocabulary:
        raise CorpusError(f"corpus '{label}' holds token id {corpus.max_token_id}, outside model '{model}''s "
                          f"vocabulary of {vocabulary} ids (0..{vocabulary - 1}): were they made with another tokenizer?")


class CorpusStore:
    def __init__(self, folder: Path, max_bytes: int, corpora_dir: Path | None = None, allow_hub: bool = False,
                 quarantine: Quarantine | None = None):
        self.folder = folder
        self.max_bytes = max_bytes
        self.quarantine = quarantine or Quarantine(folder.parent)
        self.corpora_dir = corpora_dir.resolve() if corpora_dir else None
        self.allow_hub = allow_hub
        self._hashes: dict = {}  # dataset files' hashes by (path, size, mtime)
        folder.mkdir(parents=True, exist_ok=True)
        self.list()  # quarantines what cannot be read, the built-in's record included (written again next)
        self._ensure_builtin()
        self._streams: dict[tuple[str, str, int | None], CorpusTokens] = {}
        self._lock = threading.Lock()  # only around the dict: tokenising holds the stream's own lock

    def _ensure_builtin(self) -> None:
        data = _builtin_text()
        self.builtin_id = bytes_id(hashlib.sha256(data).hexdigest())
        if not (self.folder / f"{self.builtin_id}.json").exists():
            self._write(self.builtin_id, data, CorpusInfo(
                corpus_id=self.builtin_id, name="tiny-shakespeare", format="text", n_bytes=len(data), builtin=True))

    def _write(self, corpus_id: str, data: bytes, info: CorpusInfo) -> None:
        (self.folder / f"{corpus_id}.data").write_bytes(data)
        atomic_write(self.folder / f"{corpus_id}.json", info.model_dump_json().encode())

    def list(self) -> list[CorpusInfo]:
        infos = [self._info(p) for p in sorted(self.folder.glob("*.json"))]
        return sorted((i for i in infos if i is not None), key=lambda c: (not c.builtin, c.name))

    def _info(self, path: Path) -> CorpusInfo | None:
        """A corpus' record, or None once a bad one (or one whose text is gone) is quarantined."""
        def read(data: bytes) -> CorpusInfo:
            info = CorpusInfo.model_validate_json(data)
            if info.corpus_id != path.stem:
                raise ValueError(f"it names corpus {info.corpus_id!r}, not {path.stem!r}")
            stored = self.folder / f"{info.corpus_id}.data"
            if info.format != "dataset" and (not stored.exists() or stored.stat().st_size != info.n_bytes):
                raise ValueError(f"its data file {stored.name} is missing or not {info.n_bytes} bytes")
            return info

        info = self.quarantine.load(path, "corpus", read)
        if info is None:
            data = self.folder / f"{path.stem}.data"
            if data.exists():
                self.quarantine.put(data, "corpus", "its record could not be read")
        return info

    def resolve(self, ref: "str | DatasetRef") -> CorpusInfo:
        """'default', a corpus_id, the name of exactly one corpus, or a Hugging Face dataset."""
        if isinstance(ref, DatasetRef):
            return self._dataset(ref)
        corpus_id = self.builtin_id if ref == DEFAULT_NAME else ref
        if is_valid_id(corpus_id) and (self.folder / f"{corpus_id}.json").exists():
            info = self._info(self.folder / f"{corpus_id}.json")
            if info is None:
                raise CorpusError(f"corpus '{ref}' could not be read; it was moved to quarantine/ (see /health)", 404)
            return info
        named = [c for c in self.list() if c.name == ref]
        if len(named) == 1:
            return named[0]
        if named:
            raise CorpusError(f"corpus name '{ref}' is ambiguous: use one of the corpus_ids "
                              f"{', '.join(c.corpus_id for c in named)}", 409)
        raise CorpusError(f"unknown corpus '{ref}': use 'default', a corpus name or a corpus_id from "
                          "GET /v1/corpora", 404)

    def _dataset(self, ref: DatasetRef) -> CorpusInfo:
        """A dataset as a corpus: registered (listed, resolvable by id) the first time it is named."""
        source = locate(ref.hf, self.corpora_dir, self.allow_hub, self._hashes)
        corpus_id = corpus_id_of(source)
        path = self.folder / f"{corpus_id}.json"
        if path.exists() and (info := self._info(path)) is not None:
            return info
        check_column(source)
        n_bytes = sum(Path(f).stat().st_size for f in source.get("files", []))
        info = CorpusInfo(corpus_id=corpus_id, name=ref.hf.path, format="dataset", n_bytes=n_bytes, source=source)
        atomic_write(path, info.model_dump_json().encode())
        return info

    async def upload(self, chunks: AsyncIterator[bytes], name: str, fmt: str) -> CorpusInfo:
        """Stream an upload to disk while hashing it and checking UTF-8 (and JSONL) on the fly."""
        digest = hashlib.sha256()
        decoder = codecs.getincrementaldecoder("utf-8")() if fmt != "npy" else None
        jsonl = _JsonlChecker() if fmt == "jsonl" else None
        n_bytes = 0
        fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".partial")
        try:
            with os.fdopen(fd, "wb") as f:
                async for chunk in chunks:
                    n_bytes += len(chunk)
                    if n_bytes > self.max_bytes:
                        raise CorpusError(f"corpus is larger than the limit of {self.max_bytes} bytes", 413)
                    if decoder is not None:
                        try:
                            text = decoder.decode(chunk)
                        except UnicodeDecodeError as exc:
                            raise CorpusError(f"corpus is not UTF-8 text (byte {n_bytes - len(chunk) + exc.start})",
                                              415) from None
                        if jsonl:
                            jsonl.feed(text)
                    digest.update(chunk)
                    f.write(chunk)
            if n_bytes == 0:
                raise CorpusError("corpus is empty", 422)
            counts = {}
            if decoder is None:
                try:
                    n_tokens, max_id = check_token_ids(Path(tmp))
                except ValueError as exc:
                    raise CorpusError(f"format=npy: {exc}", 422) from None
                counts = {"n_tokens": n_tokens, "max_token_id": max_id}
            else:
                try:
                    tail = decoder.decode(b"", final=True)
                except UnicodeDecodeError:
                    raise CorpusError("corpus is not UTF-8 text (truncated character at the end)", 415) from None
                if jsonl:
                    jsonl.feed(tail)
                    jsonl.finish()
            corpus_id = bytes_id(digest.hexdigest())
            info = CorpusInfo(corpus_id=corpus_id, name=name, format=fmt, n_bytes=n_bytes, **counts)
            os.replace(tmp, self.folder / f"{corpus_id}.data")
            atomic_write(self.folder / f"{corpus_id}.json", info.model_dump_json().encode())
            return info
        finally:
            Path(tmp).unlink(missing_ok=True)

    def stream_for(self, info: CorpusInfo, model) -> "CorpusTokens | PretokenizedTokens":
        """The corpus' token stream for a source model (``cache_server.models.SourceModel``)."""
        return self.stream(info, model.tokenizer, model.info.fingerprint, model.separator_token_id,
                           model.bridge.cfg.d_vocab)

    def stream(self, info: CorpusInfo, tokenizer, tokenizer_key: str, separator: int | None,
               vocabulary: int = 2**31 - 1) -> CorpusTokens | PretokenizedTokens:
        """The corpus' token stream under this tokenizer; documents joined by the separator token.
        A pre-tokenized corpus is its ids, whatever the tokenizer (a dataset's checked against the
        model's ``vocabulary`` as they are read)."""
        if info.format == "npy":
            return PretokenizedTokens(self.folder / f"{info.corpus_id}.data")
        key = (info.corpus_id, tokenizer_key, separator)
        with self._lock:
            if key not in self._streams:
                name = f"{info.corpus_id}-{bytes_id(hashlib.sha256(repr(key[1:]).encode()).hexdigest())}"
                if info.format == "dataset":
                    self._streams[key] = DatasetTokens(info.source, self.folder / "tokens", name, tokenizer, separator,
                                                       vocabulary)
                else:
                    self._streams[key] = CorpusTokens(self.folder / f"{info.corpus_id}.data", info.format,
                                                      self.folder / "tokens", name, tokenizer, separator)
            return self._streams[key]

    def tokens(self, info: CorpusInfo, tokenizer, tokenizer_key: str, separator: int | None,
               n: int | None = None, vocabulary: int = 2**31 - 1) -> np.ndarray:
        """The first ``n`` tokens of the stream (fewer if the corpus has fewer; all when None)."""
        stream = self.stream(info, tokenizer, tokenizer_key, separator, vocabulary)
        have, _ = stream.ensure(n)
        return stream.array(have if n is None else min(n, have))


class _JsonlChecker:
    """Checks JSONL line by line as text streams in: each line an object with a string 'text'."""

    def __init__(self):
        self.buffer = ""
        self.line_no = 0

    def feed(self, text: str) -> None:
        if "\n" not in text:  # a long line: no re-splitting of what is buffered
            self.buffer += text
        else:
            *lines, rest = (self.buffer + text).split("\n")
            for line in lines:
                self._check(line)
            self.buffer = rest
        if len(self.buffer) > MAX_JSONL_LINE:
            raise CorpusError(f"JSONL line {self.line_no + 1} is longer than {MAX_JSONL_LINE:,} characters: split the "
                              "document over several lines (each a document), or upload it as format=text")

    def finish(self) -> None:
        self._check(self.buffer)

    def _check(self, line: str) -> None:
        """Whatever passes is harvestable: valid JSON, not nested past the parser's depth, a string
        "text" that is text (JSON can escape a lone surrogate, which no tokenizer takes)."""
        self.line_no += 1
        if not line.strip():
            return
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CorpusError(f"JSONL line {self.line_no} is not valid JSON: {exc.msg}") from None
        except RecursionError:
            raise CorpusError(f"JSONL line {self.line_no} is nested too deeply to read") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CorpusError(f'JSONL line {self.line_no} must be an object with a string "text" field')
        try:
            record["text"].encode("utf-8")
        except UnicodeEncodeError as exc:
            raise CorpusError(f'JSONL line {self.line_no}: "text" holds {exc.object[exc.start:exc.end]!a} at character '
                              f"{exc.start}, a lone surrogate escape, which is not text") from None
