"""Content-hash ids for datasets and corpora, and their validation.

Ids arrive in URLs; they are only ever compared against this pattern and then used as keys of
objects we created ourselves, never joined into a filesystem path as received.
"""

import hashlib
import json
import re
from typing import Any

ID_LENGTH = 24
_ID_PATTERN = re.compile(rf"[0-9a-f]{{{ID_LENGTH}}}")  # fullmatch: no trailing newline slips through


def content_id(obj: Any) -> str:
    """Hash a JSON-serialisable object into an id: the same content always gives the same id.

    >>> content_id({"b": 1, "a": [1, 2]}) == content_id({"a": [1, 2], "b": 1})
    True
    >>> len(content_id("x"))
    24
    """
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:ID_LENGTH]


def bytes_id(data_sha256_hex: str) -> str:
    """Id of raw content already hashed with sha256 (corpora are hashed while they stream in)."""
    return data_sha256_hex[:ID_LENGTH]


def is_valid_id(value: str) -> bool:
    """
    >>> is_valid_id("0123456789abcdef01234567")
    True
    >>> is_valid_id("../../etc/passwd")
    False
    >>> is_valid_id("0123456789abcdef01234567\\n")
    False
    """
    return isinstance(value, str) and _ID_PATTERN.fullmatch(value) is not None
