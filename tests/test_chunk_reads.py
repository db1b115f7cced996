"""The server's local chunk reads: cached bytes on the event loop, the rest in a thread."""

import asyncio
import os
import time

import numpy as np
import pytest

from cache_server.store.chunk_reads import _read_cached, _read_from, read_local_chunk


def test_a_chunk_file_is_read_whole_with_an_etag_that_changes_when_it_is_rewritten(tmp_path):
    path = tmp_path / "0"
    data = np.random.default_rng(0).integers(0, 256, 3 * 2**20 + 17, dtype=np.uint8)
    path.write_bytes(data.tobytes())
    got, etag = asyncio.run(read_local_chunk(path))
    assert bytes(got) == data.tobytes()
    assert asyncio.run(read_local_chunk(path))[1] == etag  # the same file: the same ETag
    time.sleep(0.01)
    path.write_bytes(data[::-1].tobytes())  # same size, new content
    got, new_etag = asyncio.run(read_local_chunk(path))
    assert bytes(got) == data[::-1].tobytes() and new_etag != etag
    assert asyncio.run(read_local_chunk(tmp_path / "missing")) is None
    assert asyncio.run(read_local_chunk(path / "not-a-folder")) is None


def test_bytes_not_read_from_the_cache_are_read_in_full_afterwards(tmp_path):
    """Where the page cache holds none of a file (or the file system cannot say), what the
    non-blocking read got is completed from where it stopped."""
    path = tmp_path / "0"
    data = np.arange(1_000_000, dtype=np.uint32).view(np.uint8)
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        out = np.zeros_like(data)
        done = _read_cached(fd, out)
        assert 0 <= done <= len(data) and np.array_equal(out[:done], data[:done])
        out[done // 2 :] = 0
        _read_from(fd, out, done // 2)
        assert np.array_equal(out, data)
        with pytest.raises(OSError, match="shorter than its size"):
            _read_from(fd, np.zeros(len(data) + 5, np.uint8), 0)
    finally:
        os.close(fd)
