"""Which SAEs of a sweep are on its frontier: the best reconstruction (or downstream score) for
their L0, so that a table says at a glance which ones to keep.

An SAE is on a frontier when no other SAE of the sweep is at least as sparse (L0 no higher) and
strictly better (lower FVU, or higher CE loss score), or as good and strictly sparser.
"""

GUIDANCE = ("guide: FVU is the share of the held-out variance the SAE leaves unexplained (0 is perfect); the CE "
            "loss score is the share of the model's next-token loss it keeps (1 is perfect). Reference, "
            "bench/quality.py: TopK k=32 on shakespeare-gpt's blocks.1 residual stream, 400k training tokens, "
            "1,536 latents: FVU 0.050 held out (sparsify 1.3.3 on the same rows: 0.053).")


def on_frontier(points: list[tuple[float, float | None]], higher_is_better: bool = False) -> list[bool]:
    """For each (L0, value) whether it is on the sweep's frontier; a point without a value is not.

    >>> on_frontier([(16, 0.3), (32, 0.2), (32, 0.25), (64, 0.4)])
    [True, True, False, False]
    >>> on_frontier([(16, 0.9), (32, 0.95), (20, None)], higher_is_better=True)
    [True, True, False]
    """
    sign = -1.0 if higher_is_better else 1.0

    def beats(a: tuple[float, float], b: tuple[float, float]) -> bool:
        (l0_a, va), (l0_b, vb) = a, b
        return l0_a <= l0_b and sign * va <= sign * vb and (l0_a < l0_b or sign * va < sign * vb)

    scored = [(l0, v) for l0, v in points if v is not None]
    return [v is not None and not any(beats(other, (l0, v)) for other in scored) for l0, v in points]


def marks(results: list[dict], score) -> list[str]:
    """A table cell per SAE: 'FVU' / 'CE' / 'FVU+CE' for the frontiers it is on, '' otherwise."""
    fvu = on_frontier([(r["l0"], r["fvu"]) for r in results])
    ce = on_frontier([(r["l0"], score(r)) for r in results], higher_is_better=True)
    return ["+".join(name for name, on in (("FVU", f), ("CE", c)) if on) for f, c in zip(fvu, ce)]
