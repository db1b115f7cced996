"""Big corpora: what a harvest from a GB-sized text costs the server, and tokenisation's speed.

    .venv/bin/python bench/corpus.py [--mb 200] [--mb 1024] [--dataset-mb 1024] [--packing document]

First a harvest from a parquet dataset of --dataset-mb in the server's --corpora-dir, named as
{"hf": {"path": ...}} (same figures as below). For each corpus size (the built-in corpus repeated, as one text file): upload it to a cache server
started here, submit a harvest of --tokens tokens from it, and report the submit's answer time,
the time to the first committed chunk and the server's peak RSS (VmHWM) against its RSS before the
upload (the baseline: a server with its model loaded). Then, in this process, the tokens/s of the
server's on-disk token stream (read a block at a time, appended to disk) against the tokenizer
alone on the same text in the same blocks (--tokenize-mb of it).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cache_server.corpora.corpus_store import _builtin_text  # noqa: E402
from cache_server.corpora.tokens import LINES_PER_BLOCK, READ_BYTES, CorpusTokens  # noqa: E402
from cache_server.corpora.hf_datasets import DatasetTokens, locate  # noqa: E402
from cache_server.models import ModelRegistry  # noqa: E402
from shared.schemas import HFDataset  # noqa: E402
from trainer.data.local_server import LocalServer  # noqa: E402


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def write_corpus(path: Path, megabytes: int) -> int:
    text = _builtin_text()
    with path.open("wb") as f:
        for _ in range(-(-megabytes * (1 << 20) // len(text))):
            f.write(text)
    return path.stat().st_size


def write_dataset(folder: Path, megabytes: int) -> int:
    """A parquet dataset of the built-in corpus repeated, 12 lines a row, written a row group at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = _builtin_text().decode().splitlines(keepends=True)
    group = pa.table({"text": ["".join(lines[i:i + 12]) for i in range(0, len(lines), 12)]})
    folder.mkdir(parents=True)
    with pq.ParquetWriter(folder / "train.parquet", group.schema, compression="none") as writer:
        for _ in range(-(-megabytes * (1 << 20) // len(_builtin_text()))):
            writer.write_table(group)
    return (folder / "train.parquet").stat().st_size


def harvest_from(path: Path | None, args, tmp: Path, dataset: dict | None = None) -> dict:
    """A harvest from the text file at ``path`` (uploaded), or from ``dataset`` in ``tmp``/corpora."""
    extra = ["--no-hub", "--corpora-dir", str(tmp / "corpora")]
    with LocalServer(tmp / "store", extra_args=extra) as server, httpx.Client(base_url=server.url, timeout=600) as c:
        request = {"model": args.model, "hooks": ["blocks.0.hook_resid_post"], "n_tokens": 256, "context_size": 128}
        c.post("/v1/harvests", json=request)  # the model loaded: the baseline is a server ready to harvest
        time.sleep(2)
        pid = server.process.pid
        before = rss_kb(pid, "VmRSS")
        if dataset is None:
            with path.open("rb") as f:
                corpus = c.post("/v1/corpora?name=big", content=iter(lambda: f.read(1 << 20), b"")).json()["corpus_id"]
        t0 = time.perf_counter()
        answer = c.post("/v1/harvests", json={**request, "corpus": corpus if dataset is None else dataset,
                                              "n_tokens": args.tokens, "packing": args.packing})
        assert answer.status_code == 202, answer.text
        submit = time.perf_counter() - t0
        job_id, first = answer.json()["job_id"], None
        while (job := c.get(f"/v1/harvests/{job_id}").json())["status"] not in ("completed", "failed"):
            if first is None and job["tokens_done"] > 0:
                first = time.perf_counter() - t0
            time.sleep(0.05)
        assert job["status"] == "completed", job
        return {"submit_s": submit, "first_chunk_s": first or time.perf_counter() - t0,
                "done_s": time.perf_counter() - t0, "rss_before_mb": before / 1024, "peak_rss_mb": rss_kb(pid, "VmHWM") / 1024}


def tokenize_rates(path: Path, args, tmp: Path) -> dict:
    tokenizer = ModelRegistry(None, torch.device("cpu"), allow_hub=False).get(args.model).tokenizer
    head = tmp / "head.txt"
    with path.open("rb") as f:
        head.write_bytes(f.read(args.tokenize_mb << 20))
    lines = head.read_bytes().decode().splitlines(keepends=True)
    blocks = ["".join(lines[i:i + LINES_PER_BLOCK]) for i in range(0, len(lines), LINES_PER_BLOCK)]
    per_call = max(1, READ_BYTES // max(1, len(blocks[0].encode())))
    ours, alone = [], []
    for round in range(args.rounds):  # alternated, best of each: the machine is shared and noisy
        stream = CorpusTokens(head, "text", tmp / f"tokens{round}", "bench", tokenizer, None)
        t0 = time.perf_counter()
        n, _ = stream.ensure(None)
        ours.append(n / (time.perf_counter() - t0))
        backend = stream._fast  # the same tokenizer, truncation and padding off, as the stream uses it
        t0 = time.perf_counter()
        count = sum(len(e.ids) for lo in range(0, len(blocks), per_call)
                    for e in backend.encode_batch(blocks[lo:lo + per_call], add_special_tokens=False))
        alone.append(count / (time.perf_counter() - t0))
        assert count == n
    ours, alone = max(ours), max(alone)
    dataset = dataset_rate(head, tokenizer, tmp, args.rounds)
    return {"stream_tok_s": ours, "tokenizer_tok_s": alone, "ratio": ours / alone, "tokens": n, **dataset}


def dataset_rate(head: Path, tokenizer, tmp: Path, rounds: int) -> dict:
    """The same text as a parquet dataset, 12 lines a row: read with datasets and tokenised (rows as
    documents), against the tokenizer alone on those documents' blocks."""
    import datasets

    lines = head.read_bytes().decode().splitlines(keepends=True)
    docs = ["".join(lines[i:i + 12]) for i in range(0, len(lines), 12)]
    folder = tmp / "dataset"
    datasets.Dataset.from_dict({"text": docs}).to_parquet(str(folder / "train.parquet"))
    source = locate(HFDataset(path="dataset"), tmp, allow_hub=False)
    ours, alone = [], []
    for round in range(rounds):
        stream = DatasetTokens(source, tmp / f"dtokens{round}", "bench", tokenizer, None, 2**31 - 1)
        t0 = time.perf_counter()
        n, _ = stream.ensure(None)
        ours.append(n / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        count = sum(len(e.ids) for lo in range(0, len(docs), 600)
                    for e in stream._fast.encode_batch(docs[lo:lo + 600], add_special_tokens=False))
        alone.append(count / (time.perf_counter() - t0))
    return {"dataset_tok_s": max(ours), "dataset_tokenizer_tok_s": max(alone), "dataset_ratio": max(ours) / max(alone)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, action="append", help="corpus sizes in MB (default 200 and 1024)")
    parser.add_argument("--tokens", type=int, default=262_144, help="tokens each harvest asks for")
    parser.add_argument("--model", default="tiny-random-gpt")
    parser.add_argument("--tokenize-mb", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dataset-mb", type=int, default=1024, help="size of the parquet dataset harvested (0: none)")
    parser.add_argument("--packing", default="concatenate", choices=("concatenate", "document"))
    args = parser.parse_args()
    if args.dataset_mb:
        with tempfile.TemporaryDirectory() as tmp:
            size = write_dataset(Path(tmp) / "corpora" / "big", args.dataset_mb)
            result = harvest_from(None, args, Path(tmp), {"hf": {"path": "big"}})
            print(f"{size / 2**20:,.0f} MB parquet dataset (--corpora-dir), harvest of {args.tokens:,} tokens: "
                  + json.dumps({k: round(v, 2) for k, v in result.items()}), flush=True)
    results = {}
    for mb in args.mb or [200, 1024]:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "corpus.txt"
            size = write_corpus(path, mb)
            results[mb] = harvest_from(path, args, Path(tmp))
            print(f"{size / 2**20:,.0f} MB corpus, harvest of {args.tokens:,} tokens: " + json.dumps(
                {k: round(v, 2) for k, v in results[mb].items()}), flush=True)
            if mb == (args.mb or [200])[0]:
                rates = tokenize_rates(path, args, Path(tmp))
                print(f"tokenising {args.tokenize_mb} MB ({rates['tokens']:,} tokens): stream "
                      f"{rates['stream_tok_s']:,.0f} tok/s, tokenizer alone {rates['tokenizer_tok_s']:,.0f} tok/s, "
                      f"ratio {rates['ratio']:.2f}", flush=True)
                print(f"the same text as a parquet dataset (12 lines a row): {rates['dataset_tok_s']:,.0f} tok/s vs the "
                      f"tokenizer alone on its rows {rates['dataset_tokenizer_tok_s']:,.0f} tok/s, ratio "
                      f"{rates['dataset_ratio']:.2f}", flush=True)


if __name__ == "__main__":
    main()
