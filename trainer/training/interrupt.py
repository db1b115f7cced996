"""Ctrl-C during training: the first one asks the loop to stop after its step (it then saves a
checkpoint, and a run started again continues from it); a second one aborts at once."""

import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def stop_on_ctrl_c(prog: str) -> Iterator[Callable[[], bool]]:
    """Yields ``should_stop`` for ``Trainer.train``; the previous SIGINT handler comes back after."""
    requested = False

    def on_interrupt(signum, frame) -> None:
        nonlocal requested
        if requested:
            raise KeyboardInterrupt
        requested = True
        print(f"\n{prog}: stopping after this step and saving a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield lambda: requested
    finally:
        signal.signal(signal.SIGINT, previous)
