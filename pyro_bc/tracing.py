"""The one-pass loss replayed from TorchScript traces: a training step without Python in its
forward pass.

:func:`~pyro_bc.elbo.one_pass_negative_elbo` runs the guide and the model, Pyro's effect handlers
and the closed-form KLs in Python on every step: a fixed cost per step, whatever the batch size.
:class:`TracedLoss` records the tensor operations of that Python once per input signature
with ``torch.jit.trace`` and replays the recording on later steps. The model and the guide stay
what they are: the trace is made by running them, the same random numbers are drawn in the same
order, and the replay runs unoptimized, op by op, so a step gives the same loss, gradients and
parameters as the Python, bit for bit (``tests/test_tracing.py``).

A trace fixes what the Python decided while it was made. What the step decides from shapes (the
batch's size, the dataset's) is part of the input signature, so a new one is traced. What it
decides from tensor values cannot be replayed: a conversion of a tensor to a Python number or
bool in code outside torch, Pyro and pyro_bc (a prior or a network you wrote) makes
:class:`TracedLoss` refuse, with a warning, and the step runs its Python every time. So does a
trace whose replay does not give the Python's loss on the batch it was made from.

Example::

    loss_fn = TracedLoss(model, guide)
    out = loss_fn(x, y)  # (loss, logits), or None where the loss cannot be traced
"""

from __future__ import annotations

import os
import traceback
import warnings

import pyro
import torch

from .checkpoint import restore_rng_state, rng_state
from .elbo import one_pass_negative_elbo

#: input signatures traced at most: a loader whose batch shapes keep changing trains untraced
MAX_TRACES = 8

_TORCH = os.path.dirname(torch.__file__) + os.sep
#: the code whose decisions the input signature covers (they depend on shapes only)
_LIBRARIES = (_TORCH, *(os.path.dirname(path) + os.sep for path in (pyro.__file__, __file__)))


class _OnePassLoss(torch.nn.Module):
    """The one-pass loss as a module of the guide and the model, so that a trace reads their
    parameters and buffers as attributes (shared, not copied) rather than as constants."""

    def __init__(self, model, guide):
        super().__init__()
        self.model = model
        self.guide = guide

    def forward(self, x, y):
        with pyro.validation_enabled(False):
            loss, logits = one_pass_negative_elbo(self.model, self.guide.sample, x, y)
        return (loss,) if logits is None else (loss, logits)


class TracedLoss:
    """:func:`~pyro_bc.elbo.one_pass_negative_elbo` of ``model`` and ``guide.sample``, replayed
    from one TorchScript trace per input signature (shapes, dtypes and device of ``x`` and ``y``,
    the model's training mode and dataset size).

    Making a trace runs the forward pass three more times (the trace, then the Python and the
    replay on the same batch, which must agree bit for bit), without changing the random stream
    or the model's buffers (batch norm's running statistics); that step holds more memory for a
    moment (a VGG-16 of width 32 at batch 128 on CPU: a peak about 40% above an untraced
    step's), later steps as much as untraced ones. A signature beyond :data:`MAX_TRACES` is
    refused: batches whose shapes keep changing would be traced at nearly every step. Calling it
    returns ``(loss, logits)`` (``logits`` None if the observed distribution has none), or None
    once tracing has been refused, after one warning that says why.

    Example::

        traced = TracedLoss(model, guide)
        loss, logits = traced(x, y)
        loss.backward()
    """

    def __init__(self, model, guide):
        self.module = _OnePassLoss(model, guide)
        self.traces = {}
        self.refused = None  # why tracing was refused, once it has been

    def __call__(self, x, y):
        if self.refused is not None:
            return None
        model = self.module.model
        key = (
            x.shape,
            x.dtype,
            x.device,
            y.shape,
            y.dtype,
            model.training,
            getattr(model, "dataset_size", None),
        )
        trace = self.traces.get(key)
        if trace is None:
            if len(self.traces) == MAX_TRACES:
                return self._refuse(f"more than {MAX_TRACES} batch shapes, each a new trace")
            trace = self._trace(x, y)
            if trace is None:
                return None
            self.traces[key] = trace
        # the graph executor's optimizations may rewrite the arithmetic (and the last bits);
        # unoptimized, the replay runs the Python's ops one by one
        with torch.jit.optimized_execution(False):
            out = trace(x, y)
        return out[0], (out[1] if len(out) > 1 else None)

    def _trace(self, x, y):
        if x.device.type not in ("cpu", "cuda"):
            return self._refuse(f"tracing on {x.device.type} is not supported")
        buffers = [b.detach().clone() for b in self.module.buffers()]
        try:
            trace, why = self._checked_trace(x, y)
        except Exception as e:  # noqa: BLE001 - any failure leaves the Python step
            trace, why = None, f"{type(e).__name__}: {e}"
        finally:
            with torch.no_grad():
                for buffer, saved in zip(self.module.buffers(), buffers, strict=True):
                    buffer.copy_(saved)
        return trace if why is None else self._refuse(why)

    def _checked_trace(self, x, y):
        """``(trace, None)``, or ``(None, why)`` where the trace would not replay the loss."""
        devices = [x.device] if x.device.type == "cuda" else []
        decided = []

        def note(message, category, *args, **kwargs):
            # a constant (torch.tensor(1.0) in a prior) is the same in every replay
            constant = "registered as constants" in str(message)
            if issubclass(category, torch.jit.TracerWarning) and not constant:
                frame = _deciding_frame()
                if frame is not None:
                    decided.append(frame)

        with torch.random.fork_rng(devices=devices), warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = note  # the tracer's warnings are ours to read, not the user's
            trace = torch.jit.trace(self.module, (x, y), check_trace=False)
            if decided:
                return None, f"{decided[0]} converts a tensor to a Python value"
            state = rng_state()
            with torch.no_grad():
                expected = self.module(x, y)
                restore_rng_state(state)
                with torch.jit.optimized_execution(False):
                    replayed = trace(x, y)
        # bit for bit, a NaN (a diverged step) equal to a NaN
        same = len(replayed) == len(expected) and all(
            torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)
            for a, b in zip(replayed, expected, strict=True)
        )
        return (trace, None) if same else (None, "the trace's loss differs from the Python's")

    def _refuse(self, why):
        self.refused = why
        warnings.warn(
            f"pyro_bc: the training loss is not traced ({why}); each step runs the model and "
            "the guide in Python, with the same results, only slower",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def _deciding_frame():
    """``"file:line"`` of the code that converted a tensor to a Python value, or None if it is a
    library's: the innermost frame outside torch (a prior runs under a device mode, whose
    frames are torch's)."""
    for frame in reversed(traceback.extract_stack()[:-2]):  # without note and this function
        if frame.filename == warnings.__file__ or frame.filename.startswith(_TORCH):
            continue
        return None if frame.filename.startswith(_LIBRARIES) else f"{frame.filename}:{frame.lineno}"
    return None
