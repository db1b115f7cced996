"""A window's seeded shuffle: the order its rows are emitted in, and where each row goes.

numpy's ``Generator.permutation`` costs ~14 ns a row and holds the GIL while it runs (the fetch
threads wait for it); a Fisher–Yates shuffle driven by SplitMix64, compiled by numba, costs ~2 and
runs without the GIL. Its random stream is this project's own, so a seed gives the same order
whatever numpy's version: a resumed run relies on rebuilding the same window.
"""

import numpy as np
from jaxtyping import Int
from numba import njit


def _compiled(fn):
    """numba-compiled, and cached on disk (a process then loads it in ms rather than compiling it
    in ~0.75 s); uncached where no cache folder is writable (numba refuses at decoration)."""
    try:
        return njit(nogil=True, cache=True)(fn)
    except RuntimeError:
        return njit(nogil=True)(fn)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S32 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(32)


@_compiled
def _mix(z: np.uint64) -> np.uint64:
    """SplitMix64's output function: a bijection of 64-bit words that scatters every input bit."""
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    return z ^ (z >> _S31)


def seed_of(*parts: int) -> np.uint64:
    """One 64-bit seed from several non-negative integers (a run's seed, an epoch, a window)."""
    z = np.uint64(0)
    for part in parts:
        z = _mix(np.uint64((int(z) + int(_GOLDEN) + part) % 2**64))
    return np.uint64(z)


@_compiled
def permutation(n: int, seed: np.uint64) -> Int[np.ndarray, " n"]:
    """A seeded random permutation of ``range(n)``. Each swap draws 32 random bits and scales them
    to the range (Lemire's multiply-shift), so a choice's bias is below n / 2**32."""
    order = np.arange(n)
    state = np.uint64(seed)
    for i in range(n - 1, 0, -1):
        state += _GOLDEN
        j = np.int64(((_mix(state) >> _S32) * np.uint64(i + 1)) >> _S32)
        order[i], order[j] = order[j], order[i]
    return order


@_compiled
def places_of(order: Int[np.ndarray, " n"], first: int) -> Int[np.ndarray, " n"]:
    """Where each row goes when rows are emitted in ``order`` from position ``first`` on: the
    inverse permutation, shifted."""
    places = np.empty_like(order)
    for i in range(len(order)):
        places[order[i]] = first + i
    return places
