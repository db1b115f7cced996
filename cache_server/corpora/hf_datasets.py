"""Corpora named as Hugging Face datasets: a folder in ``--corpora-dir`` (``save_to_disk`` output,
or parquet / JSONL / arrow files) or a dataset on the hub, read with ``datasets`` a block of rows
at a time into the same on-disk token stream as an uploaded corpus (``corpus_tokens``).

A text column is documents, a row each, tokenised as a JSONL corpus is; a column of token-id lists
is used as it is (no separator), each id checked against the model's vocabulary. A corpus' id
covers the dataset's path, configuration, split, column and what identifies its contents: the
files' hash for a local folder (a changed file is a new corpus), the resolved commit on the hub.
"""

import itertools
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import xxhash

from cache_server.corpora.tokens import READ_BYTES, CorpusTokens, _State
from cache_server.errors import ServiceError
from shared.ids import content_id
from shared.schemas import HFDataset

DATA_FILES = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".arrow": "arrow"}
HUB_TIMEOUT = 10.0


class DatasetError(ServiceError):
    """A dataset reference that names nothing readable, or a column that is not there."""


def locate(ref: HFDataset, corpora_dir: Path | None, allow_hub: bool, hashes: dict | None = None) -> dict:
    """Where ``ref`` is read from, and the fingerprint its corpus id covers (``hashes`` keeps the
    files' hashes by their sizes and times, so a submit does not read a big dataset again). Its
    column is checked by ``check_column``, once, when the corpus is new."""
    folder = _local_folder(corpora_dir, ref.path)
    if folder is not None:
        kind, files = _local_kind(folder, ref.split)
        source = {"kind": kind, "folder": str(folder), "files": [str(f) for f in files],
                  "fingerprint": _files_hash(folder, files, {} if hashes is None else hashes)}
    elif allow_hub:
        source = {"kind": "hub", "fingerprint": _hub_commit(ref, corpora_dir)}
    else:
        raise DatasetError(f"unknown dataset '{ref.path}': not a folder in the server's --corpora-dir "
                           f"({corpora_dir or 'none set'}), and the hub is disabled", 404)
    source.update(ref.model_dump())
    return source


def corpus_id_of(source: dict) -> str:
    return content_id({k: source[k] for k in ("kind", "path", "name", "split", "column", "revision", "fingerprint")})


def _local_folder(corpora_dir: Path | None, name: str) -> Path | None:
    """Only folders listed in --corpora-dir are candidates: no request string becomes a path."""
    if corpora_dir is None or not corpora_dir.is_dir():
        return None
    for candidate in itertools.chain(corpora_dir.glob("*/"), corpora_dir.glob("*/*/")):
        if candidate.is_dir() and candidate.relative_to(corpora_dir).as_posix() == name:
            return candidate
    return None


def _local_kind(folder: Path, split: str) -> tuple[str, list[Path]]:
    if (folder / "dataset_dict.json").exists():  # save_to_disk of a DatasetDict: a folder a split
        splits = sorted(p.name for p in folder.iterdir() if (p / "state.json").exists())
        if split not in splits:
            raise DatasetError(f"dataset folder '{folder.name}' has no split '{split}'; its splits: {splits}", 422)
        return "disk", [folder / split / "state.json", *sorted((folder / split).glob("*.arrow"))]
    if (folder / "state.json").exists():
        return "disk", [folder / "state.json", *sorted(folder.glob("*.arrow"))]
    files = sorted(p for p in folder.rglob("*") if p.suffix in DATA_FILES and p.is_file())
    if not files:
        raise DatasetError(f"dataset folder '{folder.name}' holds no save_to_disk dataset and no "
                           f"{', '.join(DATA_FILES)} files", 422)
    named = [p for p in files if split in p.relative_to(folder).as_posix().replace("-", "/").replace("_", "/").split("/")]
    files = named or files  # files named by split (train-00000.parquet, train/...), or all of them as the split
    if len({DATA_FILES[p.suffix] for p in files}) > 1:
        raise DatasetError(f"dataset folder '{folder.name}' mixes file types: keep one of {', '.join(DATA_FILES)}", 422)
    return "files", files


def _files_hash(folder: Path, files: list[Path], hashes: dict) -> str:
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.exists())
    if key in hashes:
        return hashes[key]
    digest = xxhash.xxh3_128()
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode())
        with path.open("rb") as f:
            while block := f.read(1 << 22):
                digest.update(block)
    hashes[key] = digest.hexdigest()
    return hashes[key]


def _hub_commit(ref: HFDataset, corpora_dir: Path | None) -> str:
    from huggingface_hub import HfApi

    try:
        return HfApi().dataset_info(ref.path, revision=ref.revision, timeout=HUB_TIMEOUT).sha
    except Exception as exc:  # offline, unreachable, no such dataset
        raise DatasetError(f"unknown dataset '{ref.path}': not a folder in the server's --corpora-dir "
                           f"({corpora_dir or 'none set'}), and the hub did not find it ({type(exc).__name__}: "
                           f"{str(exc)[:200]})", 404) from None


def _table(source: dict):
    """The dataset itself: a memory-mapped ``Dataset`` for a save_to_disk folder, else a
    streaming ``IterableDataset`` (data files, or the hub at the resolved commit)."""
    import datasets

    if source["kind"] == "disk":
        folder = Path(source["folder"])
        return datasets.load_from_disk(str(folder / source["split"] if (folder / "dataset_dict.json").exists() else folder))
    if source["kind"] == "files":
        return datasets.load_dataset(DATA_FILES[Path(source["files"][0]).suffix], data_files=source["files"],
                                     split="train", streaming=True)
    return datasets.load_dataset(source["path"], source["name"], split=source["split"], streaming=True,
                                 revision=source["fingerprint"])


def _parquet_rows(files: list[str], column: str, skip: int) -> Iterator[list]:
    """Parquet files a row group at a time, with pyarrow: memory is a row group's, whatever the
    files' size (``datasets``' streaming reader held hundreds of MB per GB of file, measured)."""
    import pyarrow.parquet as pq

    for name in files:
        parquet = pq.ParquetFile(name)
        for group in range(parquet.num_row_groups):
            n = parquet.metadata.row_group(group).num_rows
            if skip >= n:  # a resumed read skips whole groups by their row counts
                skip -= n
                continue
            values = parquet.read_row_group(group, columns=[column]).column(0).to_pylist()[skip:]
            skip = 0
            yield from (values[lo : lo + 1024] for lo in range(0, len(values), 1024))


def _is_parquet(source: dict) -> bool:
    return source["kind"] == "files" and Path(source["files"][0]).suffix == ".parquet"


def open_rows(source: dict, skip: int = 0) -> Iterator:
    """The column's values from row ``skip`` on, in batches."""
    if _is_parquet(source):
        return _parquet_rows(source["files"], source["column"], skip)
    table, column = _table(source), source["column"]
    if source["kind"] == "disk":
        return (table[lo : lo + 1024][column] for lo in range(skip, len(table), 1024))
    return ([row[column]] for row in table.skip(skip))


def _first_row(source: dict) -> dict | None:
    if _is_parquet(source):
        import pyarrow.parquet as pq

        for name in source["files"]:
            parquet = pq.ParquetFile(name)
            groups = [g for g in range(parquet.num_row_groups) if parquet.metadata.row_group(g).num_rows]
            if groups:
                return parquet.read_row_group(groups[0]).slice(0, 1).to_pylist()[0]
        return None
    table = _table(source)
    if source["kind"] == "disk":
        return table[0] if len(table) else None
    return next(iter(table), None)


def check_column(source: dict) -> None:
    """The column is there and holds text or token ids (``source["ids"]`` says which)."""
    first = _first_row(source)
    if first is None:
        raise DatasetError(f"dataset '{source['path']}' split '{source['split']}' has no rows", 422)
    if source["column"] not in first:
        raise DatasetError(f"dataset '{source['path']}' has no column '{source['column']}'; its columns: "
                           f"{sorted(first)}", 422)
    value = first[source["column"]]
    if not isinstance(value, str) and not (isinstance(value, list) and all(isinstance(v, int) for v in value[:16])):
        raise DatasetError(f"column '{source['column']}' of dataset '{source['path']}' holds {type(value).__name__}: "
                           "it must hold text or lists of token ids", 422)
    source["ids"] = not isinstance(value, str)


class DatasetTokens(CorpusTokens):
    """A dataset column's token stream: ``byte_offset`` counts rows here."""

    def __init__(self, source: dict, folder: Path, key: str, tokenizer, separator: int | None, vocabulary: int):
        super().__init__(Path(source.get("folder", ".")), "dataset", folder, key, tokenizer, separator)
        self.source, self.vocabulary = source, vocabulary
        self._rows: Iterator | None = None
        self._at = -1

    def _batches_from(self, row: int) -> Iterator:
        if self._rows is None or self._at != row:  # a fresh reader (a restart, another process' rows)
            self._rows, self._at = open_rows(self.source, skip=row), row
        return self._rows

    def _extend(self, state: _State, limit: int | None = None) -> int:
        """About ``READ_BYTES`` of text (or ids) more, whole rows (a batch of them: ``limit`` does not
        apply); returns the bytes read."""
        values, size, at_end = [], 0, False
        batches = self._batches_from(state.byte_offset)
        while size < READ_BYTES:
            batch = next(batches, None)
            if batch is None:
                at_end = True
                break
            values += batch
            size += sum(len(v) * (1 if isinstance(v, str) else 4) for v in batch)
        self._at = state.byte_offset + len(values)
        if values and not isinstance(values[0], str):
            pieces = [np.asarray(v, dtype=np.int64) for v in values]
            for ids in pieces:
                if len(ids) and (ids.min() < 0 or ids.max() >= self.vocabulary):
                    self._rows = None
                    bad = int(ids.max() if ids.max() >= self.vocabulary else ids.min())
                    raise DatasetError(f"dataset '{self.source['path']}' column '{self.source['column']}' holds token id "
                                       f"{bad}, outside the model's vocabulary of {self.vocabulary} ids", 422)
            ends = state.n_tokens + np.cumsum([len(ids) for ids in pieces])
            docs = list(zip((ends - [len(ids) for ids in pieces]).tolist(), ends.tolist()))
        else:
            pieces, docs = self._documents(values, state, at_end)
        self._save(state, pieces, len(values), docs, at_end)
        return max(size, 1)
