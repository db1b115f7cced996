"""Schedules and budgets, as in saev: ``Warmup`` (linear ramp), ``LRSchedule`` (warmup, constant,
linear decay to 0 at the end of the run) and ``BatchLimiter`` (token budget)."""

from collections.abc import Iterable, Iterator


class Warmup:
    """Linearly increases from ``init`` to ``final`` over ``n_steps`` steps.

    >>> w = Warmup(0.0, 1.0, 4)
    >>> [w.step() for _ in range(5)]
    [0.25, 0.5, 0.75, 1.0, 1.0]
    """

    def __init__(self, init: float, final: float, n_steps: int):
        self.init, self.final, self.n_steps = init, final, n_steps
        self._step = 0

    def step(self) -> float:
        self._step += 1
        if self._step < self.n_steps:
            return self.init + (self.final - self.init) * (self._step / self.n_steps)
        return self.final

    def state_dict(self) -> dict:
        return {"step": self._step}

    def load_state_dict(self, state: dict) -> None:
        self._step = state["step"]

    def __repr__(self) -> str:
        return f"Warmup(init={self.init}, final={self.final}, n_steps={self.n_steps})"


class LRSchedule(Warmup):
    """``Warmup`` from 0 to ``lr`` over ``warmup_steps``, then constant, then a linear decay to 0
    over the last ``decay_steps`` of ``total_steps`` (Anthropic's recipe decays over the last 20%),
    its last step at ``lr / (decay_steps + 1)``, not at 0 (a step that would change nothing).

    >>> s = LRSchedule(1.0, warmup_steps=2, decay_steps=2, total_steps=6)
    >>> [round(s.step(), 3) for _ in range(6)]
    [0.5, 1.0, 1.0, 1.0, 0.667, 0.333]
    """

    def __init__(self, lr: float, warmup_steps: int, decay_steps: int, total_steps: int):
        super().__init__(0.0, lr, warmup_steps)
        self.decay_steps, self.total_steps = decay_steps, total_steps

    def step(self) -> float:
        lr = super().step()
        left = self.total_steps - self._step + 1  # this step and those after it
        return lr * min(1.0, left / (self.decay_steps + 1)) if self.decay_steps else lr

    def __repr__(self) -> str:
        return f"LRSchedule(lr={self.final}, warmup_steps={self.n_steps}, decay_steps={self.decay_steps}, " \
               f"total_steps={self.total_steps})"


class BatchLimiter:
    """Stops an endless batch iterator once ``n_samples`` rows have been yielded.

    >>> list(BatchLimiter(iter([[1, 2], [3, 4], [5, 6]]), n_samples=4, batch_size=2))
    [[1, 2], [3, 4]]
    """

    def __init__(self, batches: Iterable, n_samples: int, batch_size: int, n_seen: int = 0):
        self.batches, self.n_samples, self.batch_size, self.n_seen = batches, n_samples, batch_size, n_seen

    def __len__(self) -> int:
        return max(0, (self.n_samples - self.n_seen) // self.batch_size)

    def __iter__(self) -> Iterator:
        for batch in self.batches:
            if self.n_seen + self.batch_size > self.n_samples:
                return
            self.n_seen += self.batch_size
            yield batch
