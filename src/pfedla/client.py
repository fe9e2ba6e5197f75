"""Local training and evaluation of one client's model on in-memory tensors."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from pfedla.errors import PfedlaError
from pfedla.models import LayerLayout


class ClientTimeout(PfedlaError):
    """A client's local training ran past its deadline (``client_timeout``)."""


@dataclass(frozen=True)
class TrainSettings:
    """What a client needs to know to train: plain SGD for a number of local epochs.

    ``last_batch`` says how a batch shorter than ``batch_size`` (an epoch's last) is weighed:
    "nominal" sums its losses and divides by ``batch_size``, so every sample weighs 1/batch_size in
    every step; "mean" takes its own mean, so each of its samples weighs up to batch_size times more
    than in a full batch (one hard sample alone in it gets a full ``lr`` step: issue 20 measured a
    fitted client falling from 99.6% to 47% in that one step); "drop" skips it (unless it is the
    whole split).

    ``timeout`` (seconds, None: unlimited) is checked between batches: past it the client
    gives up with ``ClientTimeout``; a batch already running is not interrupted (on CUDA,
    where batches are queued asynchronously, the check can lag by the queued work).
    """

    epochs: int
    batch_size: int
    lr: float
    timeout: float | None = None
    proximal_mu: float = 0.0  # FedProx: gradient of (mu/2)·‖θ − θ_start‖² added to every step
    last_batch: str = "nominal"


@dataclass
class ClientUpdate:
    """What a client sends back: Δ = θ' − θ̄ per layer (None for a layer it keeps to itself),
    and how much data produced it."""

    client_id: int
    num_samples: int
    delta: list[torch.Tensor | None]
    train_loss: float

    def sent(self) -> list[torch.Tensor]:
        """The layers that travel to the server."""
        return [d for d in self.delta if d is not None]

    def bytes_sent(self) -> int:
        return sum(d.numel() * d.element_size() for d in self.sent())


@dataclass
class ClientFailure:
    """A client that did not deliver a usable update this round, and why."""

    client_id: int
    reason: str


def failure_reason(error: Exception) -> str:
    """One line saying why a client's training produced no update."""
    if isinstance(error, ClientTimeout):
        return str(error)
    return f"training raised {type(error).__name__}: {error}"


@dataclass
class EvalResult:
    """Summed test outcome of one client's personalized model."""

    correct: int
    loss_sum: float
    count: int

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.count, 1)


@dataclass
class ModelState:
    """A whole model as a client holds it: one flat vector per layer and its buffers by name."""

    layers: list[torch.Tensor]
    buffers: dict[str, torch.Tensor]

    def clone(self) -> ModelState:
        return ModelState([t.clone() for t in self.layers], {k: b.clone() for k, b in self.buffers.items()})


class LocalTrainer:
    """Trains any client's model on one private copy of the architecture.

    The copy's parameters are views into one flat tensor per layer, so starting a client
    is one copy per layer and every batch runs the plain forward pass (swapping parameters
    in per batch, as ``functional_call`` does, cost about 10% of a round). Buffers
    (normalization running statistics) are the client's: they are loaded before and read
    back after training, which runs in train mode.
    """

    def __init__(self, model: nn.Module, layout: LayerLayout):
        self.model = copy.deepcopy(model)
        self.layout = layout
        self.flat = [t.detach().clone() for t in layout.flatten(dict(self.model.named_parameters()))]
        named = {}
        for name, view in layout.unflatten(self.flat).items():
            module_name, _, param_name = name.rpartition(".")
            named[name] = nn.Parameter(view)
            setattr(self.model.get_submodule(module_name), param_name, named[name])
        self.layer_params = [[named[slot.name] for slot in layer] for layer in layout.slots]
        self.buffers = dict(self.model.named_buffers())
        # BatchNorm cannot normalize a single sample in train mode: a last batch of one is skipped
        batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.model.modules())
        self.smallest_batch = 2 if batch_norm else 1

    def train(self, start: ModelState, train_x: torch.Tensor, train_y: torch.Tensor, settings: TrainSettings,
              generator: torch.Generator, trainable: frozenset[int] | None = None,
              anchor: list[torch.Tensor] | None = None) -> tuple[ModelState, float]:
        """E epochs of minibatch SGD from ``start``; returns the trained model and the mean loss.

        Only the ``trainable`` layers (default: all) move. With ``settings.proximal_mu`` > 0 the
        loss gains (mu/2)·‖θ − anchor‖², the anchor being ``start`` unless given.
        """
        with torch.no_grad():
            for flat, layer in zip(self.flat, start.layers, strict=True):
                flat.copy_(layer)
            for name, buffer in self.buffers.items():
                buffer.copy_(start.buffers[name])
        chosen = range(self.layout.num_layers) if trainable is None else sorted(trainable)
        params = [p for index in chosen for p in self.layer_params[index]]
        anchors = None
        if settings.proximal_mu > 0:
            named = self.layout.unflatten(anchor if anchor is not None else start.layers)
            anchors = [named[slot.name].detach().clone() for index in chosen
                       for slot in self.layout.slots[index]]
        self.model.train()
        loss = _sgd_epochs(self.model, params, train_x, train_y, settings, generator, anchors,
                           self.smallest_batch)
        return ModelState([flat.clone() for flat in self.flat],
                          {name: b.detach().clone() for name, b in self.buffers.items()}), loss


def _sgd_epochs(model: nn.Module, params: list[nn.Parameter], train_x: torch.Tensor, train_y: torch.Tensor,
                settings: TrainSettings, generator: torch.Generator,
                anchor: list[torch.Tensor] | None = None, smallest_batch: int = 1) -> float:
    n = len(train_y)
    deadline = None if settings.timeout is None else time.monotonic() + settings.timeout
    loss_total, batches = torch.zeros((), device=train_x.device), 0
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator).to(train_x.device)
        for start in range(0, n, settings.batch_size):
            if deadline is not None and time.monotonic() > deadline:
                total = settings.epochs * -(-n // settings.batch_size)
                raise ClientTimeout(f"timed out: {batches} of {total} batches done when "
                                    f"client_timeout={settings.timeout:g} s ran out")
            batch = order[start : start + settings.batch_size]
            if len(batch) < smallest_batch:
                continue
            if settings.last_batch == "drop" and len(batch) < settings.batch_size <= n:
                continue
            loss = nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
            weight = len(batch) / settings.batch_size if settings.last_batch == "nominal" else 1.0
            grads = torch.autograd.grad(loss * weight, params)
            with torch.no_grad():  # θ ← θ − lr·∇, all parameters in one fused call
                if anchor is not None:  # ∇ of (mu/2)·‖θ − θ_start‖² is mu·(θ − θ_start)
                    drift = torch._foreach_sub(params, anchor)
                    grads = torch._foreach_add(grads, drift, alpha=settings.proximal_mu)
                torch._foreach_add_(params, grads, alpha=-settings.lr)
            loss_total += loss.detach()  # summed on-device: no sync per batch
            batches += 1
    return float(loss_total) / max(batches, 1)


@torch.no_grad()
def evaluate_client(
    model: nn.Module,
    layout: LayerLayout,
    state: ModelState,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 2048,
) -> EvalResult:
    """Accuracy and summed cross-entropy of the model ``state`` on (x, y), in eval mode (running
    statistics, not batch statistics)."""
    tensors = {**layout.unflatten(state.layers), **state.buffers}
    was_training = model.training
    model.eval()
    correct, loss_sum = 0, 0.0
    try:
        for start in range(0, len(y), batch_size):
            logits = functional_call(model, tensors, (x[start : start + batch_size],))
            target = y[start : start + batch_size]
            loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
            correct += int((logits.argmax(1) == target).sum())
    finally:
        model.train(was_training)
    return EvalResult(correct, loss_sum, len(y))


def select_device(setting: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for ``cuda`` without one is an error."""
    from pfedla.errors import ConfigError

    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "cuda was requested but no CUDA device is available (use auto or cpu)")
    if setting in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def update_norm(update: ClientUpdate) -> float:
    """The L2 norm of the whole update (every layer it carries), in float64."""
    return math.sqrt(sum(float((d.double() ** 2).sum()) for d in update.sent()))


def update_problem(update: ClientUpdate, max_norm: float | None) -> str | None:
    """Why an update must be rejected on its own (non-finite values, norm over the limit), or None."""
    if not all(bool(torch.isfinite(d).all()) for d in update.sent()):
        return "update has NaN or Inf values"
    if max_norm is not None:
        norm = update_norm(update)
        if norm > max_norm:
            return f"update L2 norm {norm:.4g} exceeds max_update_norm {max_norm:.4g}"
    return None


def screen_updates(updates: list[ClientUpdate], max_norm: float | None, norm_ratio: float | None
                   ) -> tuple[list[ClientUpdate], list[ClientFailure]]:
    """Split a round's updates into the accepted ones and failures, in client order.

    First each update on its own (``update_problem``); then, with ``norm_ratio``, an update whose
    norm exceeds ``norm_ratio`` times the median norm of the round's *other* usable updates. The
    median leaves the suspect out so that with two clients each is judged by the other, and one
    finite but enormous update cannot drag the reference up to its own size.
    """
    usable, failures = [], []
    for update in sorted(updates, key=lambda u: u.client_id):
        if problem := update_problem(update, max_norm):
            failures.append(ClientFailure(update.client_id, problem))
        else:
            usable.append(update)
    accepted = usable
    if norm_ratio is not None and len(usable) >= 2:
        norms = [update_norm(u) for u in usable]
        accepted = []
        for index, update in enumerate(usable):
            reference = float(np.median(norms[:index] + norms[index + 1:]))
            if reference > 0 and norms[index] > norm_ratio * reference:  # all-zero peers: no scale
                failures.append(ClientFailure(update.client_id, (
                    f"update L2 norm {norms[index]:.4g} exceeds update_norm_ratio={norm_ratio:g} times "
                    f"the median {reference:.4g} of the round's other updates")))
            else:
                accepted.append(update)
    return accepted, sorted(failures, key=lambda f: f.client_id)
