"""Training and evaluation: SVI with ``TraceMeanField_ELBO``, test error; checkpoints are in
:mod:`pyro_bc.checkpoint`."""

from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.util import warn_if_nan
from tqdm.auto import tqdm

from . import distributed as bc_distributed
from . import poutine as bc_poutine
from .batches import (
    batches,
    check_labels_inside,
    checked,
    count_outside,
    require_reiterable,
)
from .checkpoint import (
    CheckpointError,
    load_checkpoint,
    non_finite_entries,
    restore_rng_state,
    save_checkpoint,
)
from .checks import is_number, require_count
from .elbo import MeanFieldELBO, one_pass_negative_elbo, supports_one_pass
from .tracing import TracedLoss


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


class TrainingDivergedError(RuntimeError):
    """:func:`fit` stopped because the loss or a parameter became NaN or infinite.

    ``epoch`` and ``step`` (both counted from 1) say where; the checkpoint on disk, if any, is
    still the last good state.

    Example::

        try:
            fit(model, guide, loader, epochs=100, checkpoint="run.pt")
        except TrainingDivergedError as e:
            print(e.epoch, e.step)  # resume from run.pt with a smaller lr
    """

    def __init__(self, message: str, epoch: int, step: int):
        super().__init__(message)
        self.epoch = epoch
        self.step = step


class _NegativeELBO(torch.nn.Module):
    """The loss of one mini-batch as a module of the guide, so ``DistributedDataParallel`` can
    wrap it (DDP synchronises the gradients of the module it runs).

    With ``one_pass`` it computes the loss by :func:`~pyro_bc.elbo.one_pass_negative_elbo` from
    the second call on, if the first (validated) call's traces show that it applies; with
    ``trace`` too, it replays that loss from TorchScript traces (:mod:`pyro_bc.tracing`).
    """

    def __init__(self, model, guide, elbo, handler, observed, one_pass=False, trace=False):
        super().__init__()
        self.guide = guide
        self.__dict__["model"] = model  # not a submodule: the guide owns every parameter
        self.elbo = elbo
        self.handler = handler
        self.observed = observed
        self.may_one_pass = one_pass
        self.one_pass = False
        self.traced = TracedLoss(model, guide) if trace and one_pass else None

    def forward(self, x, y, validate: bool = False):
        if self.one_pass and not validate:
            out = None if self.traced is None else self.traced(x, y)
            if out is None:
                with pyro.validation_enabled(False):
                    out = one_pass_negative_elbo(self.model, self.guide.sample, x, y)
            loss, self.observed.logits = out
            return loss
        with pyro.validation_enabled(validate), self.handler(), self.observed:
            if not (validate and self.may_one_pass):
                return self.elbo.differentiable_loss(self.model, self.guide.sample, x, y)
            # the loss of differentiable_loss (one particle), from traces kept for the check
            traces = self.elbo._get_trace(self.model, self.guide.sample, (x, y), {})
            model_trace, guide_trace = traces
            loss = warn_if_nan(self.elbo._negative_elbo(model_trace, guide_trace), "loss")
        self.one_pass = supports_one_pass(model_trace, guide_trace)
        return loss


class TrainingStep:
    """One SVI step of ``guide`` on a mini-batch: the hot path of :func:`fit`.

    Computes the negative ELBO of ``TraceMeanField_ELBO`` (closed-form KLs where registered; see
    :class:`~pyro_bc.elbo.MeanFieldELBO`),
    under local reparameterization unless told otherwise, and takes an optimizer step. Pyro's
    validation runs on the first step only: its checks cost as much as a small network's step.
    Later steps compute the same loss in one pass over the guide and the model
    (:func:`~pyro_bc.elbo.one_pass_negative_elbo`) and, with ``trace=True`` (the default),
    replay it from a TorchScript trace per batch shape (:class:`~pyro_bc.tracing.TracedLoss`):
    the same numbers bit for bit, without the Python of Pyro's handlers on every step. Pass
    ``trace=False`` for a model whose Python must run every step (one that keeps Python state);
    one that branches on tensor values is detected and runs untraced.
    Calling it returns the loss and the logits of the batch (for a running error), as device
    tensors: it never waits for the device. With ``distributed=True`` the loss runs under
    ``DistributedDataParallel`` (see :mod:`pyro_bc.distributed`).

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
        distributed: bool = False,
        one_pass: bool = True,
        trace: bool = True,
    ):
        self.model = model
        self.guide = guide
        self.optimizer = optimizer or adam([*guide.parameters(), *model.parameters()], lr=lr)
        self.elbo = MeanFieldELBO(num_particles=num_particles)
        handler = (
            bc_poutine.local_reparameterization
            if local_reparameterization
            else contextlib.nullcontext
        )
        self.steps_taken = 0
        self._observed = _ObservedLogits()
        one_pass = one_pass and local_reparameterization and num_particles == 1
        self.loss = _NegativeELBO(
            model, guide, self.elbo, handler, self._observed, one_pass, trace and not distributed
        )
        if distributed:
            self.loss = bc_distributed.data_parallel(self.loss)

    def backward(self, x, y):
        """The loss and logits of the batch, with the guide's gradients computed (no update).

        Example::

            loss, logits = step.backward(x, y)
            grads = [p.grad for p in guide.parameters()]
        """
        loss = self.loss(x, y, validate=self.steps_taken == 0)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return loss.detach(), self._observed.logits

    def __call__(self, x, y):
        loss, logits = self.backward(x, y)
        self.optimizer.step()
        self.steps_taken += 1
        return loss, logits


#: steps between two reads of the running loss for the progress bar (each read waits for the
#: device, so not every step)
PROGRESS_EVERY = 100


def fit(
    model,
    guide,
    train_loader,
    *,
    epochs: int = 1,
    lr: float | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    num_particles: int = 1,
    local_reparameterization: bool = True,
    test_loader=None,
    callback=None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    keep_last: int = 0,
    seed: int | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    metadata: dict | None = None,
    lr_schedule=None,
    distributed: bool = False,
    trace: bool = True,
) -> History:
    """Trains ``guide`` by stochastic variational inference with ``TraceMeanField_ELBO``.

    The KL terms of every site with a registered closed form are exact; the likelihood is
    scaled by ``dataset_size / batch_size`` by the model's data plate. Adam (``lr``, 1e-3 by
    default) over the guide's parameters and the model's own (batch norm's) unless ``optimizer``
    is given. Each step is a
    :class:`TrainingStep`. Training runs where the guide's parameters are: batches are moved
    there. The running loss and error stay on the device and are read once per epoch (and every
    :data:`PROGRESS_EVERY` steps for the progress bar).

    :param train_loader: iterable of ``(x, y)`` mini-batches (a ``DataLoader``).
    :param local_reparameterization: sample pre-activations (the paper's training) rather than
        weights.
    :param test_loader: if given, the test error with posterior means is recorded every epoch.
    :param callback: ``callback(epoch, record)`` after every epoch; ``record`` is the epoch's dict.
    :param checkpoint: path of a checkpoint written atomically after every epoch
        (:mod:`pyro_bc.checkpoint`); with ``resume=True`` training continues from it, and a
        resumed run gives the same parameters as an uninterrupted one. A resumed run keeps the
        checkpoint's learning rate unless ``lr`` (or ``optimizer``) asks for another, which then
        applies, with a warning. A checkpoint past ``epochs`` is an error.
    :param keep_last: keep this many older checkpoints beside it (``{name}.1`` is the newest).
    :param seed: seeds every epoch (``seed + epoch``), so runs and resumed runs are reproducible.
        On CUDA, convolutions are reproducible bit for bit only with deterministic cuDNN
        kernels: set ``torch.backends.cudnn.deterministic = True`` before training (without it
        two runs of LeNet-5-Caffe from the same seed differed by ~5e-6 after 9 steps).
    :param max_steps: stop every epoch after this many steps (quick runs and smoke tests).
    :param metadata: plain data (str, numbers, lists, dicts) stored in the checkpoint, e.g. how
        to rebuild the model (``pyro-bc compress`` reads it).
    :param lr_schedule: ``lr_schedule(epoch) -> factor``: every epoch (counted from 0) runs at
        the optimizer's initial learning rates times this factor. A function of the epoch alone,
        so a resumed run follows the same schedule (see :func:`linear_decay`).
    :param distributed: data-parallel training in a process group (:mod:`pyro_bc.distributed`):
        each process trains on its shard of every mini-batch of ``train_loader`` (a
        ``DataLoader``), process 0 writes the checkpoint. ``seed`` defaults to 0.
    :param trace: replay the loss from TorchScript traces after the first step, with the same
        results (see :class:`TrainingStep`); False runs the model's Python on every step.
    :raises TrainingDivergedError: when the loss or a parameter becomes non-finite, naming the
        epoch and the step; no checkpoint with non-finite values is written.

    Example::

        history = pyro_bc.fit(model, guide, train_loader, epochs=200, test_loader=test_loader)
    """
    require_count(epochs, "fit: epochs", minimum=0)
    require_count(num_particles, "fit: num_particles", minimum=1)
    require_count(keep_last, "fit: keep_last", minimum=0)
    if seed is not None:
        require_count(seed, "fit: seed", minimum=0)
        seed = int(seed)  # Python's random.seed refuses numpy integers
    if lr is not None and not (is_number(lr) and 0 < lr < math.inf):
        raise ValueError(f"fit: lr must be a positive learning rate, got {lr!r}")
    if max_steps is not None:
        require_count(max_steps, "fit: max_steps", minimum=1)
    if epochs > 1:
        require_reiterable(train_loader, "fit(train_loader=...)")
        if test_loader is not None:
            require_reiterable(test_loader, "fit(test_loader=...)")
    _warn_if_batches_stand_for_the_data_set(model, train_loader)
    if distributed:
        bc_distributed.require_process_group("fit(distributed=True)")
        seed = 0 if seed is None else seed
        train_loader = bc_distributed.shard_loader(train_loader, seed=seed)
    main_process = bc_distributed.rank() == 0
    device = _device_of(guide)
    requested_lrs = _requested_lrs(lr, optimizer)
    step = TrainingStep(
        model,
        guide,
        optimizer=optimizer,
        lr=1e-3 if lr is None else lr,
        num_particles=num_particles,
        local_reparameterization=local_reparameterization,
        distributed=distributed,
        trace=trace,
    )
    history = History()
    start_epoch = 0
    if checkpoint is not None and resume and Path(checkpoint).exists():
        state = load_checkpoint(checkpoint, guide, epochs=epochs)
        guide.load_state_dict(state["guide"])
        if state.get("model"):
            model.load_state_dict(state["model"])
        step.optimizer.load_state_dict(state["optimizer"])
        _apply_requested_lrs(step.optimizer, requested_lrs, checkpoint)
        history.epochs = list(state["history"])
        start_epoch = state["epoch"]
        restore_rng_state(state["rng"])

    base_lrs = [group.get("initial_lr", group["lr"]) for group in step.optimizer.param_groups]
    for group, lr0 in zip(step.optimizer.param_groups, base_lrs, strict=True):
        group["initial_lr"] = lr0
    model.train()
    # float64 sums of thousands of losses keep their digits; MPS has no float64
    sum_dtype = torch.float32 if device.type == "mps" else torch.float64
    for epoch in range(start_epoch, epochs):
        if seed is not None:
            # each process draws its own noise; process 0 draws a single process's
            pyro.set_rng_seed(seed + epoch + _RANK_SEED_STRIDE * bc_distributed.rank())
        if distributed:
            train_loader.sampler.set_epoch(epoch)
        if lr_schedule is not None:
            factor = lr_schedule(epoch)
            for group, lr0 in zip(step.optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = lr0 * factor
        started = time.perf_counter()
        # running totals on the device: reading them waits for it, so only now and then
        total_loss = torch.zeros((), dtype=sum_dtype, device=device)
        total_errors = torch.zeros((), dtype=torch.int64, device=device)
        diverged = torch.zeros((), dtype=torch.bool, device=device)
        good_steps = torch.zeros((), dtype=torch.int64, device=device)
        total_seen = steps = 0
        # tqdm iterates the loader itself: its throwaway iterator draws from the random stream
        # (as a DataLoader's does), which every resumed or committed run depends on
        progress_bar = tqdm(
            train_loader,
            desc=f"epoch {epoch + 1}/{epochs}",
            disable=not (progress and main_process),
            leave=False,
            mininterval=1.0,
        )
        for batch in progress_bar:
            if max_steps is not None and steps >= max_steps:
                break
            x, y = checked(batch, "fit")
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            loss, logits = step(x, y)
            diverged |= ~torch.isfinite(loss)
            good_steps += ~diverged
            total_loss += loss
            steps += 1
            total_seen += len(y)
            if logits is not None:
                total_errors += (logits.argmax(-1) != y).sum()
            if steps % PROGRESS_EVERY == 0 and progress and main_process:
                running, errors, bad = torch.stack(
                    [total_loss, total_errors.to(sum_dtype), diverged.to(sum_dtype)]
                ).tolist()
                progress_bar.set_postfix(
                    loss=f"{running / steps:.4g}", err=f"{errors / total_seen:.2%}", refresh=False
                )
                if bad and not distributed:
                    break
        if steps == 0:
            raise ValueError("fit: the loader yielded no batches")
        totals = torch.stack(
            [
                total_loss,
                total_errors.to(sum_dtype),
                torch.tensor(float(total_seen), dtype=sum_dtype, device=device),
            ]
        )
        first_bad = torch.where(diverged, good_steps, torch.iinfo(torch.int64).max).reshape(1)
        bc_distributed.reduce_epoch(totals, first_bad)
        loss_sum, errors, seen = totals.tolist()
        first_bad = first_bad.item()
        if first_bad != torch.iinfo(torch.int64).max:
            raise TrainingDivergedError(
                f"training diverged: the loss is not finite at epoch {epoch + 1}, step "
                f"{first_bad + 1}{_kept(checkpoint, epoch)}. Lower the learning rate (lr) or "
                "check the data for NaN or infinite values",
                epoch + 1,
                first_bad + 1,
            )
        bad = non_finite_entries(guide.state_dict())
        if bad:
            raise TrainingDivergedError(
                f"training diverged: the guide's {', '.join(bad[:5])} are not finite after epoch "
                f"{epoch + 1}, step {steps}{_kept(checkpoint, epoch)}. Lower the learning rate "
                "(lr)",
                epoch + 1,
                steps,
            )
        processes = bc_distributed.world_size()
        record = {
            "epoch": epoch + 1,
            "loss": loss_sum / max(steps * processes, 1),
            "train_error": errors / max(seen, 1),
            "seconds": time.perf_counter() - started,
        }
        if test_loader is not None:
            record["test_error"] = evaluate(model, guide, test_loader)["error"]
            model.train()
        history.epochs.append(record)
        if progress and main_process:
            tqdm.write(_format_record(record))
        if checkpoint is not None and main_process:
            save_checkpoint(
                checkpoint,
                guide,
                step.optimizer,
                epoch + 1,
                history,
                metadata,
                keep_last=keep_last,
                model=model,
            )
        if checkpoint is not None and distributed:
            bc_distributed.barrier()
        if callback is not None:
            callback(epoch + 1, record)
    return history


#: distance between the seeds of two processes' noise in one epoch
_RANK_SEED_STRIDE = 1_000_003


def _kept(checkpoint, epoch):
    if checkpoint is None:
        return ""
    if epoch == 0 or not Path(checkpoint).exists():
        return f"; no checkpoint was written to {checkpoint}"
    return f"; {checkpoint} keeps the state after epoch {epoch}"


def _device_of(module) -> torch.device:
    param = next(iter(module.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _requested_lrs(lr, optimizer):
    """The learning rates a call asks for: ``lr``, the given optimizer's, or None (keep)."""
    if lr is not None:
        return lr
    if optimizer is not None:
        return [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    return None


def _apply_requested_lrs(optimizer, requested, checkpoint):
    if requested is None:
        return
    groups = optimizer.param_groups
    old = [group.get("initial_lr", group["lr"]) for group in groups]
    new = requested if isinstance(requested, list) else [requested] * len(groups)
    if new == old:
        return
    warnings.warn(
        f"resuming {checkpoint} with lr={_one_or_all(new)}; it was trained with "
        f"lr={_one_or_all(old)}: the new learning rate applies from here on",
        stacklevel=3,
    )
    for group, value in zip(groups, new, strict=True):
        group["initial_lr"] = group["lr"] = value


def _one_or_all(values):
    return values[0] if len(set(values)) == 1 else values


def _warn_if_batches_stand_for_the_data_set(model, train_loader):
    # without dataset_size the data plate scales a mini-batch's likelihood by 1: the KL to the
    # prior then outweighs the data by len(dataset) / batch_size and prunes what the data needs
    dataset = getattr(train_loader, "dataset", None)
    batch_size = getattr(train_loader, "batch_size", None)
    if getattr(model, "dataset_size", 0) is not None or not hasattr(dataset, "__len__"):
        return
    if batch_size and len(dataset) > batch_size:
        warnings.warn(
            f"fit: the model's dataset_size is None, so each mini-batch of {batch_size} counts "
            f"as the whole data set and the KL to the prior weighs {len(dataset) / batch_size:.0f} "
            f"times too much; set model.dataset_size = len(train_loader.dataset) "
            f"({len(dataset)})",
            stacklevel=3,
        )


def pretrain(network, train_loader, *, epochs: int = 10, lr: float = 1e-3, progress: bool = True):
    """Trains a plain network (e.g. a model's ``deterministic()`` twin) with cross-entropy and Adam.

    The paper's networks reach their numbers from a pretrained start: train the twin, then
    :meth:`StructuredGuide.init_from` it.

    Example::

        twin = pretrain(LeNet300100.deterministic(), train_loader, epochs=10)
        guide.init_from(twin)
    """
    if epochs > 1:
        require_reiterable(train_loader, "pretrain(train_loader=...)")
    optimizer = torch.optim.Adam(network.parameters(), lr=lr)
    device = _device_of(network)
    network.train()
    for _ in tqdm(range(epochs), desc="pretraining", disable=not progress, leave=False):
        for x, y in batches(train_loader, "pretrain"):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
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
    x = x.to(_device_of(guide), non_blocking=True)
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
    require_count(num_samples, "evaluate: num_samples", minimum=0)
    model.eval()
    device = _device_of(guide)
    # errors, Monte Carlo errors, labels outside the classes: read once, at the end
    errors = torch.zeros(3, dtype=torch.int64, device=device)
    seen = 0
    for x, y in batches(loader, "evaluate"):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        logits = predict_logits(model, guide, x)
        errors[0] += (logits.argmax(-1) != y).sum()
        errors[2] += count_outside(y, logits.shape[-1])
        if num_samples > 0:
            probs = sum(
                predict_logits(model, guide, x, mode="sample").softmax(-1)
                for _ in range(num_samples)
            )
            errors[1] += (probs.argmax(-1) != y).sum()
        seen += len(y)
    errors, errors_mc, outside = errors.tolist()
    check_labels_inside(outside, logits.shape[-1], "evaluate")
    result = {"error": errors / seen, "n": seen}
    if num_samples > 0:
        result["error_mc"] = errors_mc / seen
    return result


__all__ = [
    "CheckpointError",
    "History",
    "TrainingDivergedError",
    "TrainingStep",
    "adam",
    "evaluate",
    "fit",
    "linear_decay",
    "load_checkpoint",
    "predict_logits",
    "pretrain",
    "save_checkpoint",
]
