"""Adam for the server-side hypernetworks, kept by hand so that its state is plain named tensors from
round 0 on (checkpoints hold the same keys before and after the first step) and building one does
not import ``torch._dynamo`` (as ``torch.optim.Adam`` does: a second or more in every pipeline
step's process)."""

from __future__ import annotations

import torch
from torch import nn

from pfedla.algorithms.base import checked_tensor


class _AdamState:
    """First and second moments per parameter and step counts, saved under ``<prefix>.m|v|steps``."""

    def __init__(self, params: dict[str, nn.Parameter], lr: float, steps: torch.Tensor, prefix: str,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params, self.lr, self.betas, self.eps, self.prefix = params, lr, betas, eps, prefix
        self.exp_avg = {k: torch.zeros_like(p) for k, p in params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(p) for k, p in params.items()}
        self.steps = steps

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {f"{self.prefix}.m.{k}": t for k, t in self.exp_avg.items()}
        state.update({f"{self.prefix}.v.{k}": t for k, t in self.exp_avg_sq.items()})
        state[f"{self.prefix}.steps"] = self.steps
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.params:
            for moment, tensors in (("m", self.exp_avg), ("v", self.exp_avg_sq)):
                tensors[name].copy_(checked_tensor(state, f"{self.prefix}.{moment}.{name}", tensors[name]))
        self.steps.copy_(checked_tensor(state, f"{self.prefix}.steps", self.steps))


class RowwiseAdam(_AdamState):
    """Adam where row i of every parameter belongs to client i (pFedHN's client embeddings).

    Only the rows of the round's clients move, with their own step counts: a client that
    sits a round out keeps its row exactly (plain Adam would drift it by momentum).
    """

    def __init__(self, params: dict[str, nn.Parameter], num_clients: int, lr: float, prefix: str = "adam"):
        device = next(iter(params.values())).device
        super().__init__(params, lr, torch.zeros(num_clients, dtype=torch.float64, device=device), prefix)

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor], clients: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        self.steps[clients] += 1
        steps = self.steps[clients]
        for name, param in self.params.items():
            shape = (-1,) + (1,) * (param.ndim - 1)
            correction1 = (1 - beta1 ** steps).to(param.dtype).view(shape)
            correction2 = (1 - beta2 ** steps).to(param.dtype).view(shape)
            grad = grads[name][clients]
            m = self.exp_avg[name][clients].mul_(beta1).add_(grad, alpha=1 - beta1)
            v = self.exp_avg_sq[name][clients].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            self.exp_avg[name][clients] = m
            self.exp_avg_sq[name][clients] = v
            update = (m / correction1) / ((v / correction2).sqrt() + self.eps)
            param[clients] -= self.lr * update


class SharedAdam(_AdamState):
    """Adam over parameters every client shares (pFedHN's hypernetwork φ): one step count."""

    def __init__(self, params: dict[str, nn.Parameter], lr: float, prefix: str = "shared_adam"):
        super().__init__(params, lr, torch.zeros((), dtype=torch.float64), prefix)

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor]) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        correction1, correction2 = 1 - beta1 ** float(self.steps), 1 - beta2 ** float(self.steps)
        for name, param in self.params.items():
            grad = grads[name]
            m = self.exp_avg[name].mul_(beta1).add_(grad, alpha=1 - beta1)
            v = self.exp_avg_sq[name].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denominator = (v / correction2).sqrt_().add_(self.eps)  # the one temporary: heads are large
            param.addcdiv_(m, denominator, value=-self.lr / correction1)
