"""Corpus token streams on disk (issue 14): read a block at a time as far as a harvest needs, the
same stream as tokenising the whole corpus at once, and whole again after a crash."""

import json
import threading

import numpy as np
import pytest

from cache_server.corpora import tokens as corpus_tokens
from cache_server.corpora.corpus_store import _builtin_text
from cache_server.corpora.tokens import CorpusTokens
from cache_server.models import _minilm_tokenizer

SEPARATOR = 102


@pytest.fixture(scope="module")
def tokenizer():
    return _minilm_tokenizer()  # its file truncates and pads at 128: the stream must not


def whole_corpus_tokens(tokenizer, text: str, fmt: str) -> np.ndarray:
    """The reference: every document at once, in blocks of 64 lines, the separator after each
    document when there are several, no truncation."""
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    docs = [text] if fmt == "text" else [json.loads(line)["text"] for line in text.split("\n") if line.strip()]
    pieces = []
    for doc in docs:
        lines = doc.splitlines(keepends=True)
        blocks = ["".join(lines[i:i + 64]) for i in range(0, len(lines), 64)]
        pieces += [enc.ids for enc in backend.encode_batch(blocks, add_special_tokens=False)] if blocks else []
        pieces += [[SEPARATOR]] if len(docs) > 1 else []
    return np.concatenate([np.asarray(p, dtype=np.int32) for p in pieces])


@pytest.fixture(scope="module")
def corpora():
    text = _builtin_text().decode()[:300_000]
    # Line breaks splitlines knows besides "\n", some of them where a read may cut a "\r\n" in two.
    text = text.replace("\n\n", "\r\n\u2028x\u0085\r", 40)
    lines = text.split("\n")
    jsonl = "\n".join(json.dumps({"text": "\n".join(lines[i:i + 90])}) for i in range(0, len(lines), 90))
    # a blank line, a document longer than any read, an empty document, no newline at the end
    jsonl += "\n\n" + json.dumps({"text": "é" * 40_000}) + "\n" + json.dumps({"text": ""})
    return {"text": text, "jsonl": jsonl}


@pytest.mark.parametrize("fmt", ["text", "jsonl"])
@pytest.mark.parametrize("read_bytes", [1 << 20, 4096, 333])
def test_the_stream_read_in_blocks_is_the_whole_corpus_tokenised_at_once(tokenizer, corpora, fmt, read_bytes,
                                                                      tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_tokens, "READ_BYTES", read_bytes)
    data = tmp_path / "corpus.data"
    data.write_bytes(corpora[fmt].encode())
    expected = whole_corpus_tokens(tokenizer, corpora[fmt], fmt)
    stream = CorpusTokens(data, fmt, tmp_path / "tokens", "k", tokenizer, SEPARATOR)
    have, complete = stream.ensure(1000)  # a harvest of 1,000 tokens reads about a block, not the corpus
    one_read = len(corpora[fmt].encode()) <= read_bytes
    assert 1000 <= have <= len(expected) and complete == one_read and (one_read or have < len(expected))
    assert np.array_equal(stream.array(have), expected[:have])
    have, complete = stream.ensure(None)
    assert complete and have == len(expected)
    assert np.array_equal(stream.array(have), expected)
    assert stream.ensure(10**9) == (len(expected), True)  # the end is known: nothing more to read


def test_a_harvest_reads_only_as_far_as_it_needs(tokenizer, tmp_path):
    data = tmp_path / "big.data"
    data.write_bytes(_builtin_text() * 8)  # ~9 MB
    stream = CorpusTokens(data, "text", tmp_path / "tokens", "k", tokenizer, None)
    have, complete = stream.ensure(5000)
    state = json.loads(stream.state_path.read_text())
    assert not complete and state["byte_offset"] <= corpus_tokens.READ_BYTES and have == state["n_tokens"]
    assert stream.ensure(None, max_bytes=3 * corpus_tokens.READ_BYTES)[0] < 4 * have + 3 * corpus_tokens.READ_BYTES


def test_a_crash_between_the_two_writes_leaves_the_same_stream(tokenizer, corpora, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_tokens, "READ_BYTES", 4096)
    data = tmp_path / "corpus.data"
    data.write_bytes(corpora["jsonl"].encode())
    expected = whole_corpus_tokens(tokenizer, corpora["jsonl"], "jsonl")
    stream = CorpusTokens(data, "jsonl", tmp_path / "tokens", "k", tokenizer, SEPARATOR)
    have, _ = stream.ensure(3000)
    with stream.path.open("ab") as f:  # tokens appended, the state not yet saved
        f.write(np.arange(77, dtype=np.int32).tobytes())
    again = CorpusTokens(data, "jsonl", tmp_path / "tokens", "k", tokenizer, SEPARATOR)  # a restarted server
    assert np.array_equal(again.array(again.ensure(None)[0]), expected)
    stream.path.write_bytes(stream.path.read_bytes()[:400])  # tokens lost (a disk that lied): start again
    assert np.array_equal(again.array(again.ensure(None)[0]), expected)


def test_two_servers_extending_one_stream_at_once_agree(tokenizer, corpora, tmp_path, monkeypatch):
    """Replicas share a folder: the file lock keeps their appends from interleaving."""
    monkeypatch.setattr(corpus_tokens, "READ_BYTES", 2048)
    data = tmp_path / "corpus.data"
    data.write_bytes(corpora["text"].encode())
    streams = [CorpusTokens(data, "text", tmp_path / "tokens", "k", tokenizer, None) for _ in range(2)]
    threads = [threading.Thread(target=s.ensure, args=(None,)) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = whole_corpus_tokens(tokenizer, corpora["text"], "text")
    assert np.array_equal(streams[0].array(streams[1].ensure(None)[0]), expected)


@pytest.mark.parametrize("which", ["wordpiece", "byte-level BPE"])
def test_a_corpus_with_no_line_breaks_is_read_a_block_at_a_time_into_the_same_tokens(tokenizer, which, tmp_path,
                                                                                     monkeypatch):
    """One 'line' far longer than a read (issue 37: a 50 MB single line was tokenised whole inside
    the submit): it is cut before a whitespace run, where tokens end anyway, so the stream is the
    whole text's tokens and no read goes past READ_BYTES."""
    from transformers import AutoTokenizer

    from cache_server.models import _shakespeare_gpt_path

    if which != "wordpiece":
        tokenizer = AutoTokenizer.from_pretrained(_shakespeare_gpt_path())
    monkeypatch.setattr(corpus_tokens, "READ_BYTES", 2048)
    words = _builtin_text().decode()[:60_000].split()
    text = "".join(w + ("  " if i % 7 == 0 else " ") for i, w in enumerate(words)) + "x" * 5000 + " tail"
    data = tmp_path / "corpus.data"
    data.write_bytes(text.encode())
    stream = CorpusTokens(data, "text", tmp_path / "tokens", "k", tokenizer, SEPARATOR)
    stream.ensure(100)
    assert json.loads((tmp_path / "tokens" / "k.json").read_text())["byte_offset"] <= 2048
    have, complete = stream.ensure(None)
    ids = np.asarray(stream.array(have))
    whole = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"][:have] if which != "wordpiece" else
                       whole_corpus_tokens(tokenizer, text, "text"))
    # Only the 5,000-character 'word' (no place to cut) may tokenise otherwise at its cuts.
    word_start = len(tokenizer(text[: text.index("xxx")], add_special_tokens=False)["input_ids"])
    assert word_start > 10_000 and complete and np.array_equal(ids[:word_start], whole[:word_start])


def test_a_check_with_a_byte_budget_stops_before_a_longer_jsonl_line(tokenizer, tmp_path, monkeypatch):
    """A submit's check reads at most its budget: a JSONL line longer than that is left to the job."""
    monkeypatch.setattr(corpus_tokens, "READ_BYTES", 1024)
    data = tmp_path / "corpus.data"
    data.write_text(json.dumps({"text": "short one"}) + "\n" + json.dumps({"text": "word " * 3000}) + "\n")
    stream = CorpusTokens(data, "jsonl", tmp_path / "tokens", "k", tokenizer, SEPARATOR)
    assert stream.ensure(10**6, max_bytes=2048) == (2, False)  # the first line's tokens; the long line unread
    assert json.loads((tmp_path / "tokens" / "k.json").read_text())["byte_offset"] < 100
    assert stream.ensure(None) == (2 + 1 + 3000 + 1, True)  # the job reads it whole
