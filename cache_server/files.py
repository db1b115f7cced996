"""Small file helpers: state files are replaced whole, so a crash never leaves half of one; a full
disk is named as such, with how much room is left."""

import errno
import fcntl
import os
import shutil
from pathlib import Path

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    try:
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write leaves nothing behind


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_FULL


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def disk_full_message(exc: OSError, folder: Path) -> str:
    return (f"the disk is full ({exc.strerror}; {free_bytes(folder):,} bytes free under {folder}): free some "
            "space (delete datasets or corpora) and submit again")


def lock_store(root: Path):
    """Hold ``<root>/server.lock`` for this process' life (the kernel lets go when it exits, a
    crash included), exclusively. None: another server holds it; the file names its pid."""
    f = (root / "server.lock").open("a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    f.truncate(0)
    f.write(str(os.getpid()))
    f.flush()
    return f
