"""Training and evaluation: SVI with ``TraceMeanField_ELBO``, checkpoints, test error."""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from tqdm.auto import tqdm

from . import poutine as bc_poutine
from .elbo import MeanFieldELBO
from .files import torch_save_atomically


class _ObservedLogits(Messenger):
    """Keeps the logits of the last observed site, to report a running training error."""

    logits = None

    def _pyro_post_sample(self, msg):
        if msg["is_observed"]:
            self.logits = getattr(msg["fn"], "logits", None)


@dataclass
class History:
    """Per-epoch records of :func:`fit`: a list of dicts (epoch, loss, train_error, ...)."""

    epochs: list = field(default_factory=list)

    def __getitem__(self, key):
        return [record.get(key) for record in self.epochs]

    def __len__(self):
        return len(self.epochs)


def adam(params, lr: float = 1e-3) -> torch.optim.Adam:
    """Adam over ``params``, fused into one kernel where torch has it (CPU and CUDA tensors).

    One fused update of every parameter costs a quarter of torch's per-tensor loop on CPU.

    Example::

        optimizer = adam(guide.parameters(), lr=1e-3)
    """
    params = list(params)
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


class TrainingStep:
    """One SVI step of ``guide`` on a mini-batch: the hot path of :func:`fit`.

    Computes the negative ELBO of ``TraceMeanField_ELBO`` (closed-form KLs where registered; see
    :class:`~pyro_bc.elbo.MeanFieldELBO`),
    under local reparameterization unless told otherwise, and takes an optimizer step. Pyro's
    validation runs on the first step only: its checks cost as much as a small network's step.
    Calling it returns the loss and the logits of the batch (for a running error).

    Example::

        step = TrainingStep(model, guide, lr=1e-3)
        for x, y in train_loader:
            loss, logits = step(x, y)
    """

    def __init__(
        self,
        model,
        guide,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        lr: float = 1e-3,
        num_particles: int = 1,
        local_reparameterization: bool = True,
    ):
        self.model = model
        self.guide = guide
        self.optimizer = optimizer or adam([*guide.parameters(), *model.parameters()], lr=lr)
        self.elbo = MeanFieldELBO(num_particles=num_particles)
        self.handler = (
            bc_poutine.local_reparameterization
            if local_reparameterization
            else contextlib.nullcontext
        )
        self.steps_taken = 0
        self._observed = _ObservedLogits()

    def __call__(self, x, y):
        with pyro.validation_enabled(self.steps_taken == 0), self.handler(), self._observed:
            loss = self.elbo.differentiable_loss(self.model, self.guide.sample, x, y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps_taken += 1
        return loss.detach(), self._observed.logits


def fit(
    model,
    guide,
    train_loader,
    *,
    epochs: int = 1,
    lr: float = 1e-3,
    optimizer: torch.optim.Optimizer | None = None,
    num_particles: int = 1,
    local_reparameterization: bool = True,
    test_loader=None,
    callback=None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    seed: int | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    metadata: dict | None = None,
    lr_schedule=None,
) -> History:
    """Trains ``guide`` by stochastic variational inference with ``TraceMeanField_ELBO``.

    The KL terms of every site with a registered closed form are exact; the likelihood is
    scaled by ``dataset_size / batch_size`` by the model's data plate. Adam (``lr``) over the
    guide's parameters unless ``optimizer`` is given. Each step is a :class:`TrainingStep`.

    :param train_loader: iterable of ``(x, y)`` mini-batches (a ``DataLoader``).
    :param local_reparameterization: sample pre-activations (the paper's training) rather than
        weights.
    :param test_loader: if given, the test error with posterior means is recorded every epoch.
    :param callback: ``callback(epoch, record)`` after every epoch; ``record`` is the epoch's dict.
    :param checkpoint: path of a checkpoint written atomically after every epoch (guide,
        optimizer, random state, history); with ``resume=True`` training continues from it, and a
        resumed run gives the same parameters as an uninterrupted one.
    :param seed: seeds every epoch (``seed + epoch``), so runs and resumed runs are reproducible.
    :param max_steps: stop every epoch after this many steps (quick runs and smoke tests).
    :param metadata: plain data (str, numbers, lists, dicts) stored in the checkpoint, e.g. how
        to rebuild the model (``pyro-bc compress`` reads it).
    :param lr_schedule: ``lr_schedule(epoch) -> factor``: every epoch (counted from 0) runs at
        the optimizer's initial learning rates times this factor. A function of the epoch alone,
        so a resumed run follows the same schedule (see :func:`linear_decay`).

    Example::

        history = pyro_bc.fit(model, guide, train_loader, epochs=200, test_loader=test_loader)
    """
    step = TrainingStep(
        model,
        guide,
        optimizer=optimizer,
        lr=lr,
        num_particles=num_particles,
        local_reparameterization=local_reparameterization,
    )
    history = History()
    start_epoch = 0
    if checkpoint is not None and resume and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint)
        guide.load_state_dict(state["guide"])
        step.optimizer.load_state_dict(state["optimizer"])
        history.epochs = list(state["history"])
        start_epoch = int(state["epoch"])
        torch.set_rng_state(state["rng"])

    base_lrs = [group.get("initial_lr", group["lr"]) for group in step.optimizer.param_groups]
    for group, lr0 in zip(step.optimizer.param_groups, base_lrs, strict=True):
        group["initial_lr"] = lr0
    model.train()
    for epoch in range(start_epoch, epochs):
        if seed is not None:
            pyro.set_rng_seed(seed + epoch)
        if lr_schedule is not None:
            factor = lr_schedule(epoch)
            for group, lr0 in zip(step.optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = lr0 * factor
        started = time.perf_counter()
        total_loss = total_errors = total_seen = steps = 0
        batches = tqdm(
            train_loader,
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=not progress,
            leave=False,
            mininterval=1.0,
        )
        for x, y in batches:
            if max_steps is not None and steps >= max_steps:
                break
            loss, logits = step(x, y)
            loss = loss.item()
            steps += 1
            total_loss += loss
            total_seen += len(y)
            if logits is not None:
                total_errors += (logits.argmax(-1) != y).sum().item()
            if progress:
                batches.set_postfix(
                    loss=f"{loss:.4g}", err=f"{total_errors / total_seen:.2%}", refresh=False
                )
        record = {
            "epoch": epoch + 1,
            "loss": total_loss / max(steps, 1),
            "train_error": total_errors / max(total_seen, 1),
            "seconds": time.perf_counter() - started,
        }
        if test_loader is not None:
            record["test_error"] = evaluate(model, guide, test_loader)["error"]
            model.train()
        history.epochs.append(record)
        if progress:
            tqdm.write(_format_record(record))
        if checkpoint is not None:
            save_checkpoint(checkpoint, guide, step.optimizer, epoch + 1, history, metadata)
        if callback is not None:
            callback(epoch + 1, record)
    return history


def pretrain(network, train_loader, *, epochs: int = 10, lr: float = 1e-3, progress: bool = True):
    """Trains a plain network (e.g. a model's ``deterministic()`` twin) with cross-entropy and Adam.

    The paper's networks reach their numbers from a pretrained start: train the twin, then
    :meth:`StructuredGuide.init_from` it.

    Example::

        twin = pretrain(LeNet300100.deterministic(), train_loader, epochs=10)
        guide.init_from(twin)
    """
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    network.train()
    for _ in tqdm(range(epochs), desc="pretraining", disable=not progress, leave=False):
        for x, y in train_loader:
            loss = torch.nn.functional.cross_entropy(network(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return network.eval()


def linear_decay(start: int, end: int, final: float = 0.0):
    """A schedule for :func:`fit`: factor 1 before epoch ``start``, then linear to ``final`` at
    epoch ``end``.

    Example::

        fit(model, guide, loader, epochs=250, lr_schedule=linear_decay(200, 250))
    """
    if not 0 <= start < end:
        raise ValueError(f"linear_decay: need 0 <= start < end, got start={start}, end={end}")

    def schedule(epoch):
        progress = min(max((epoch - start) / (end - start), 0.0), 1.0)
        return 1.0 - (1.0 - final) * progress

    return schedule


def _format_record(record):
    parts = [f"epoch {record['epoch']}", f"loss {record['loss']:.5g}"]
    parts.append(f"train error {record['train_error']:.2%}")
    if "test_error" in record:
        parts.append(f"test error {record['test_error']:.2%}")
    parts.append(f"{record['seconds']:.1f} s")
    return ", ".join(parts)


def predict_logits(model, guide, x, *, mode: str = "mean"):
    """Logits of ``model`` on ``x`` under the guide.

    ``mode="mean"`` uses posterior means (``E[z] * mu``), ``"sample"`` one draw of every weight,
    ``"local"`` local reparameterization (one draw of every pre-activation).

    Example::

        logits = predict_logits(model, guide, x_test)
    """
    handlers = {
        "mean": bc_poutine.posterior_mean,
        "sample": contextlib.nullcontext,
        "local": bc_poutine.local_reparameterization,
    }
    if mode not in handlers:
        raise ValueError(f"mode must be one of {sorted(handlers)}, got {mode!r}")
    with pyro.validation_enabled(False), handlers[mode]():
        guide_trace = poutine.trace(guide).get_trace(x)
        return poutine.replay(model, trace=guide_trace)(x)


@torch.no_grad()
def evaluate(model, guide, loader, *, num_samples: int = 0) -> dict:
    """Test error with posterior means and, if ``num_samples > 0``, with Monte Carlo averaging.

    The Monte Carlo predictive averages the class probabilities over ``num_samples`` draws of all
    weights from the guide.

    Example::

        evaluate(model, guide, test_loader, num_samples=10)
        # {'error': 0.0172, 'error_mc': 0.0168, 'n': 10000}
    """
    model.eval()
    errors = errors_mc = seen = 0
    for x, y in loader:
        errors += (predict_logits(model, guide, x).argmax(-1) != y).sum().item()
        if num_samples > 0:
            probs = sum(
                predict_logits(model, guide, x, mode="sample").softmax(-1)
                for _ in range(num_samples)
            )
            errors_mc += (probs.argmax(-1) != y).sum().item()
        seen += len(y)
    result = {"error": errors / seen, "n": seen}
    if num_samples > 0:
        result["error_mc"] = errors_mc / seen
    return result


def save_checkpoint(path, guide, optimizer, epoch, history, metadata=None):
    """Writes guide and optimizer state, epoch, history, random state and metadata (atomically)."""
    torch_save_atomically(
        {
            "guide": guide.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "history": list(history.epochs),
            "rng": torch.get_rng_state(),
            "metadata": dict(metadata or {}),
        },
        path,
    )


def load_checkpoint(path) -> dict:
    """Reads a checkpoint written by :func:`fit` (tensors and plain data only, no pickle).

    Example::

        guide.load_state_dict(load_checkpoint("run/checkpoint.pt")["guide"])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise ValueError(f"checkpoint {path} cannot be read ({e}); it may be truncated") from e
    missing = {"guide", "optimizer", "epoch", "history", "rng"} - set(state)
    if missing:
        raise ValueError(f"checkpoint {path} lacks {sorted(missing)}: not written by pyro_bc.fit")
    return state
