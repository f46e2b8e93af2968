"""The two optimizers a run can use: Adam (the paper's) and signum (sparsify's: sign-SGD under the
schedule-free wrapper with momentum), behind the calls the trainer makes on either.

Schedule-free keeps two points per parameter: the module holds y (where gradients are taken, the
one training and checkpoints use) and the optimizer state holds z; the weights to evaluate and
ship are x = y + (1 - 1/momentum)(z - y). `inference_weights` computes x on a copy, so training
state is never switched back and forth (which would round y and break bit-exact resume).
"""

from __future__ import annotations

import copy

import torch
from schedulefree import ScheduleFreeWrapper
from torch import nn

from sae_modules.train.config import TrainConfig

Optimizer = torch.optim.Optimizer | ScheduleFreeWrapper

#: Devices with torch's fused Adam kernel.
FUSED_ADAM_DEVICES = frozenset({"cpu", "cuda"})


class SignSGD(torch.optim.Optimizer):
    """p ← p − lr · sign(grad): steepest descent in the L∞ norm (Bernstein et al. 2018)."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad.sign(), alpha=-group["lr"])


def build_optimizer(config: TrainConfig, module: nn.Module, lr: float) -> Optimizer:
    """A fresh optimizer for `module` as the run's settings ask, in training mode."""
    return make_optimizer(config.optimizer, module, lr, betas=config.betas, momentum=config.momentum)


def make_optimizer(
    kind: str, module: nn.Module, lr: float, betas: tuple[float, float] = (0.9, 0.999), momentum: float = 0.95
) -> Optimizer:
    """`adam` or `signum` for `module`, in training mode (also what the training benchmark races).

    Adam runs fused (one kernel per parameter, no temporaries) where torch has the kernel: on CPU
    at 4,096 latents it steps 2.3x (d_in 64) to 3.5x (d_in 256) faster than the per-op default."""
    if kind == "adam":
        params = list(module.parameters())
        fused = all(p.device.type in FUSED_ADAM_DEVICES and p.is_floating_point() for p in params)
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=fused or None)
    wrapped = ScheduleFreeWrapper(SignSGD(module.parameters(), lr=lr), momentum=momentum)
    wrapped.train()  # no state yet, so this only sets the mode; a restored state is y already
    return wrapped


@torch.no_grad()
def inference_weights(module: nn.Module, optimizer: Optimizer) -> nn.Module:
    """A copy of `module` with the weights to evaluate: the module itself for Adam, the
    schedule-free average x for signum."""
    result = copy.deepcopy(module)
    if isinstance(optimizer, ScheduleFreeWrapper):
        for param, original in zip(result.parameters(), module.parameters()):
            z = optimizer.state[original].get("z")
            if z is not None:
                param.lerp_(z, 1 - 1 / optimizer.momentum)
    return result
