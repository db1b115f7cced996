"""The steps an SAE can train with (``SAEConfig.optimizer``): Adam; sparsify's SignSGD under a
schedule-free wrapper (``schedulefree.ScheduleFreeWrapper``, Defazio et al., 2024), where the
gradient is taken at an interpolation of the base iterate and its running average, and the average
is what gets evaluated and exported (``at_average``); and the package's schedule-free Adam (the
averaging without the sign step, to measure each alone)."""

import torch
from schedulefree import AdamWScheduleFree, ScheduleFreeWrapper


class SignSGD(torch.optim.Optimizer):
    """``p -= lr * sign(grad)``: every weight moves by ``lr`` whatever its gradient's scale."""

    def __init__(self, params, lr: float):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def adam(params, lr: float) -> torch.optim.Optimizer:
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError):  # fused Adam needs a recent torch on this device
        return torch.optim.Adam(params, lr=lr)


def make_optimizer(name: str, params, lr: float):
    if name == "adam":
        return adam(params, lr)
    if name == "signsgd":
        optimizer = ScheduleFreeWrapper(SignSGD(params, lr), momentum=0.95)
    else:  # the package's own Adam (the wrapper's state would hide torch Adam's from it)
        optimizer = AdamWScheduleFree(params, lr=lr, betas=(0.9, 0.999), warmup_steps=0, weight_decay=0.0)
    optimizer.train()  # the weights hold the point the gradient is taken at
    return optimizer


def at_average(optimizer) -> None:
    """Put a schedule-free optimizer's averaged weights in the parameters (evaluation, export)."""
    if isinstance(optimizer, (ScheduleFreeWrapper, AdamWScheduleFree)):
        optimizer.eval()
