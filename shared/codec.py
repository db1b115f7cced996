"""The chunk codec: how one stored chunk's bytes are encoded, and how a client decodes them.

The server lets zarr write chunks with :func:`zarr_compressors` and serves the stored bytes as they
are; a client decodes them with :func:`decode_chunk` (see ``CodecInfo``: activations are raw,
tokens zstd).
"""

import numpy as np
import numcodecs
import torch

from shared.schemas import ArrayInfo, CodecInfo

STORAGE_DTYPES = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}


def zarr_compressors(codec: CodecInfo) -> list | None:
    from zarr.codecs import ZstdCodec

    return None if codec.name == "none" else [ZstdCodec(level=codec.level)]


def decode_chunk(data: bytes, array: ArrayInfo, chunk_rows: int, n_rows: int,
                 out: np.ndarray | None = None) -> np.ndarray:
    """Decode one chunk's stored bytes to ``[n_rows, d]`` in the storage dtype.

    Zarr stores edge chunks at full size; ``n_rows`` trims the padding of the last chunk. With
    ``out`` (a contiguous ``[n_rows, d]`` array), a full chunk decodes straight into it.

    >>> info = ArrayInfo(name="h", d=2, storage_dtype="float16", logical_dtype="float16",
    ...                  codec=CodecInfo(name="none"))
    >>> decode_chunk(np.arange(6, dtype=np.float16).tobytes(), info, chunk_rows=3, n_rows=2).tolist()
    [[0.0, 1.0], [2.0, 3.0]]
    """
    dtype = np.dtype(array.storage_dtype).newbyteorder("<")
    if array.codec.name == "none":
        rows = np.frombuffer(data, dtype=dtype).reshape(chunk_rows, array.d)[:n_rows]
        if out is None:
            return rows.copy()  # writable, and not pinning the response's buffer
        out[...] = rows
        return out
    if out is not None and n_rows == chunk_rows:
        numcodecs.Zstd().decode(data, out=out)
        return out
    full = np.empty((chunk_rows, array.d), dtype=dtype)
    numcodecs.Zstd().decode(data, out=full)  # straight into a writable array: no copy
    if out is not None:
        out[...] = full[:n_rows]
        return out
    return full[:n_rows]


def to_torch(rows: np.ndarray, logical_dtype: str) -> torch.Tensor:
    """Rows in their logical dtype; bfloat16 is stored as its uint16 bit pattern (exact)."""
    tensor = torch.from_numpy(np.ascontiguousarray(rows))
    if logical_dtype == "bfloat16":
        return tensor.view(torch.bfloat16)
    return tensor


def to_storage(rows: torch.Tensor, logical_dtype: str) -> np.ndarray:
    """The inverse of :func:`to_torch`, for writing.

    >>> x = torch.randn(4, 3).to(torch.bfloat16)
    >>> torch.equal(to_torch(to_storage(x, "bfloat16"), "bfloat16"), x)
    True
    """
    rows = rows.to(getattr(torch, logical_dtype)).contiguous().cpu()
    if logical_dtype == "bfloat16":
        return rows.view(torch.int16).numpy().view(np.uint16)
    return rows.numpy()
