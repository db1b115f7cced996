"""Data-parallel training under ``torchrun`` (torch.distributed: gloo on CPUs, NCCL on GPUs).

    torchrun --nproc-per-node 2 -m trainer --cache-url URL --dataset ID --hook H --out runs/x

Each SAE is wrapped in ``DistributedDataParallel``, so its backward all-reduces (averages) the
gradients and every rank takes the same optimizer step. The data side is split in *lanes*: the
epoch's chunk order is dealt round-robin to ``lanes`` streams, a global batch is one slice of
``batch_size / lanes`` rows from every lane, and rank ``r`` streams lanes ``r, r + size, ...``.
The lane count is fixed when a run starts (the world size, unless the sweep says otherwise) and
kept in its checkpoint, so the batches do not depend on how many ranks train them: a run resumes
with another world size (any divisor of its lanes) and sees the same rows, and a single process
with ``lanes = 2`` trains what two ranks train.

Rank 0 writes the run folder, checkpoints, metrics and exports; the others only train. Every
rank reads the checkpoint on ``--resume``, so across machines ``--out`` must be on a shared
filesystem.

A rank ends with ``exit_process``, not through interpreter finalization: see its docstring.
"""

import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _launched_size() -> int:
    """The number of ranks torchrun started (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> "World":
        """The world torchrun describes in the environment (one process when there is none)."""
        size = _launched_size()
        if size == 1:
            return cls()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(local_rank)  # NCCL wants each rank on its own GPU first
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), local_rank)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def lanes_of_rank(self, lanes: int) -> list[int]:
        return list(range(self.rank, lanes, self.size))

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP when there are several ranks (which also copies rank 0's weights to the others)."""
        if self.size == 1:
            return module
        device = next(module.parameters()).device
        return nn.parallel.DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)

    def any_(self, mask: Tensor) -> Tensor:
        """Element-wise OR over ranks (e.g. which latents fired anywhere this step)."""
        if self.size > 1:
            as_int = mask.to(torch.uint8)
            dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
            mask = as_int.bool()
        return mask

    def mean(self, values: Tensor) -> Tensor:
        if self.size > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.size
        return values

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def from_main(self, obj):
        """Rank 0's ``obj`` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def broadcast_(self, tensors: list[Tensor]) -> None:
        """Overwrite these tensors with rank 0's (after something only rank 0 did, e.g. resampling)."""
        if self.size > 1:
            for tensor in tensors:
                dist.broadcast(tensor, src=0)

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def exit_process(code: int) -> NoReturn:
    """``sys.exit(code)``; a rank under torchrun flushes its output and ends with ``os._exit``.

    Why: DDP keeps the gloo process group, and its worker threads, alive after
    ``destroy_process_group``. A worker can still hold the last reference to a Python tensor of
    the last collective (``all_gather_object``'s) and must take the GIL to drop it. If the
    interpreter is finalizing by then, CPython ends that thread with ``pthread_exit``, whose
    forced unwind through torch's noexcept code aborts the process ("terminate called without an
    active exception", SIGABRT): 2 of 61 runs of a minimal 2-rank DDP script here, in the
    rank that leaves first; once in CI for the trainer's 2-rank test.
    By the time a rank exits, its files are closed and its own threads joined, so skipping
    finalization loses nothing."""
    if _launched_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
