"""What a sweep will hold on its device, estimated before anything is allocated, so that a sweep
the device cannot hold is refused with the figures instead of growing until the kernel kills it."""

import torch

from trainer.config import Sweep
from trainer.sae.clt import memory_bytes as clt_bytes

FLOAT = 4  # bytes: the SAEs, their state and the stream's buffer are float32


def sweep_bytes(sweep: Sweep, d_in: int, n_components: int, streamed: int | None = None) -> dict[str, int]:
    """Bytes by part: each SAE's weights with their gradients and Adam's two moments; each SAE's
    batch-sized activations (pre-activations, activations and their gradients); the stream's
    shuffle buffer of training rows (``streamed`` hooks: the components and transcoders' targets)."""
    run, c = sweep.run, n_components
    widths = [cfg.width(d_in) for cfg in sweep.saes]
    parameters = sum(clt_bytes(cfg, d_in, d_in, c) // FLOAT if cfg.cross_layer else c * (2 * d_in * d_sae + 2 * d_sae + d_in)
                     for cfg, d_sae in zip(sweep.saes, widths))
    return {"parameters, gradients and Adam state": 4 * FLOAT * parameters,
            "activations of a batch": sum(3 * FLOAT * run.batch_size * c * d_sae for d_sae in widths),
            "shuffle buffer": FLOAT * (run.shuffle_buffer_rows + 2 * run.batch_size) * (streamed or c) * d_in}


def available_bytes(device: torch.device) -> int | None:
    """Memory the device can still give (None: unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            return next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def memory_problem(sweep: Sweep, d_in: int, n_components: int, device: torch.device,
                   streamed: int | None = None) -> str | None:
    """Why the device cannot hold the sweep, with the figures; None when it can (or cannot tell)."""
    parts = sweep_bytes(sweep, d_in, n_components, streamed)
    need, have = sum(parts.values()), available_bytes(device)
    if have is None or need <= have:
        return None
    detail = ", ".join(f"{name} {size / 2**30:.2f} GiB" for name, size in parts.items())
    return (f"the sweep needs about {need / 2**30:.2f} GiB on {device} ({detail}) and {have / 2**30:.2f} GiB is "
            "available: lower expansion / d_sae or batch_size, or train fewer SAEs at once")
