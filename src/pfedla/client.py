"""Local training and evaluation of one client's model on in-memory tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from pfedla.models import LayerLayout


@dataclass(frozen=True)
class TrainSettings:
    """What a client needs to know to train: plain SGD for a number of local epochs."""

    epochs: int
    batch_size: int
    lr: float


@dataclass
class ClientUpdate:
    """What a client sends back: Δ = θ' − θ̄ per layer, and how much data produced it."""

    client_id: int
    num_samples: int
    delta: list[torch.Tensor]
    train_loss: float


@dataclass
class ClientFailure:
    """A client that did not deliver a usable update this round, and why."""

    client_id: int
    reason: str


@dataclass
class EvalResult:
    """Summed test outcome of one client's personalized model."""

    correct: int
    loss_sum: float
    count: int

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)


def train_client(
    model: nn.Module,
    layout: LayerLayout,
    start_layers: list[torch.Tensor],
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    settings: TrainSettings,
    generator: torch.Generator,
) -> tuple[list[torch.Tensor], float]:
    """E epochs of minibatch SGD starting from ``start_layers``; returns θ' and the mean loss.

    ``model`` only supplies the architecture: the weights come from ``start_layers``.
    """
    weights = [layer.detach().clone().requires_grad_(True) for layer in start_layers]
    n = len(train_y)
    loss_total, batches = torch.zeros((), device=train_x.device), 0
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator).to(train_x.device)
        for start in range(0, n, settings.batch_size):
            batch = order[start : start + settings.batch_size]
            logits = functional_call(model, layout.unflatten(weights), (train_x[batch],))
            loss = nn.functional.cross_entropy(logits, train_y[batch])
            grads = torch.autograd.grad(loss, weights)
            with torch.no_grad():
                for weight, grad in zip(weights, grads, strict=True):
                    weight.sub_(grad, alpha=settings.lr)
            loss_total += loss.detach()  # summed on-device: no sync per batch
            batches += 1
    return [w.detach() for w in weights], float(loss_total) / max(batches, 1)


@torch.no_grad()
def evaluate_client(
    model: nn.Module,
    layout: LayerLayout,
    layers: list[torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 2048,
) -> EvalResult:
    """Accuracy and summed cross-entropy of the model given by ``layers`` on (x, y)."""
    params = layout.unflatten(layers)
    correct, loss_sum = 0, 0.0
    for start in range(0, len(y), batch_size):
        logits = functional_call(model, params, (x[start : start + batch_size],))
        target = y[start : start + batch_size]
        loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += int((logits.argmax(1) == target).sum())
    return EvalResult(correct, loss_sum, len(y))


def select_device(setting: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for ``cuda`` without one is an error."""
    from pfedla.errors import ConfigError

    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was requested but no CUDA device is available (use auto or cpu)")
    if setting in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def update_problem(update: ClientUpdate, max_norm: float | None) -> str | None:
    """Why an update must be rejected (non-finite values, norm over the limit), or None."""
    if not all(bool(torch.isfinite(d).all()) for d in update.delta):
        return "update has NaN or Inf values"
    if max_norm is not None:
        norm = float(torch.sqrt(sum((d.double() ** 2).sum() for d in update.delta)))
        if norm > max_norm:
            return f"update L2 norm {norm:.4g} exceeds max_update_norm {max_norm:.4g}"
    return None
