"""The ``--device`` setting of both CLIs, checked once at start-up: a name torch knows and a device
this machine has, or one line saying what to pass instead.

>>> resolve_device("cpu")
device(type='cpu')
>>> resolve_device("tpu")
Traceback (most recent call last):
ValueError: device 'tpu' is not one of auto, cpu, cuda, cuda:N
"""

import torch


def resolve_device(setting: str) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else the CPU."""
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(setting)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda") or (device.type == "cpu" and device.index):
        raise ValueError(f"device {setting!r} is not one of auto, cpu, cuda, cuda:N")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            build = "built without CUDA" if torch.version.cuda is None else f"CUDA {torch.version.cuda}, no GPU visible"
            raise ValueError(f"device {setting!r}: torch sees no CUDA device (torch {torch.__version__}, {build}); "
                             "use --device cpu")
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {setting!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
    return device
