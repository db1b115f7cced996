"""The two steps an SAE can train with (``SAEConfig.optimizer``): Adam, and sparsify's SignSGD
under a schedule-free wrapper (``schedulefree.ScheduleFreeWrapper``, Defazio et al., 2024): the
gradient is taken at an interpolation of the sign-SGD iterate and its running average, and the
average is what gets evaluated and exported (``at_average``)."""

import torch
from schedulefree import ScheduleFreeWrapper


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
    if name == "signsgd":
        optimizer = ScheduleFreeWrapper(SignSGD(params, lr), momentum=0.95)
        optimizer.train()  # the weights hold the point the gradient is taken at
        return optimizer
    return adam(params, lr)


def at_average(optimizer) -> None:
    """Put a schedule-free optimizer's averaged weights in the parameters (evaluation, export)."""
    if isinstance(optimizer, ScheduleFreeWrapper):
        optimizer.eval()
