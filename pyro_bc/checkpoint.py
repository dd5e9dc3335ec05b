"""Checkpoints of :func:`pyro_bc.fit`: a versioned schema, a SHA-256 of the contents, no pickle.

A checkpoint is a ``torch.save`` file of plain data and tensors (so ``torch.load(path,
weights_only=True)`` reads it anywhere) with the keys ``format``, ``version``, ``guide``
(state dict), ``optimizer`` (state dict), ``epoch`` (epochs done), ``history`` (one dict per
epoch), ``rng`` (``{"cpu": ByteTensor, "cuda": [ByteTensor per device]}``), ``metadata`` (plain
data) and ``sha256``, the digest of everything else. :func:`load_checkpoint` checks all of it and
raises :class:`CheckpointError` naming the file and what is wrong. Files written before the
schema existed (no ``version``, no digest, ``rng`` a bare ByteTensor) read as version 0.

Example::

    save_checkpoint("run/checkpoint.pt", guide, optimizer, epoch=3, history=records)
    state = load_checkpoint("run/checkpoint.pt", guide)  # checked against the guide's shapes
    guide.load_state_dict(state["guide"])
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from .files import torch_save_atomically, write_atomically

FORMAT = "pyro_bc.checkpoint"
#: the schema :func:`save_checkpoint` writes; :func:`load_checkpoint` reads it and version 0
SCHEMA_VERSION = 1
_LEGACY_KEYS = ("guide", "optimizer", "epoch", "history", "rng")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, corrupted, of another model or schema.

    Example::

        try:
            state = load_checkpoint(path, guide)
        except CheckpointError as e:
            print(e)  # names the file and what is wrong
    """


def save_checkpoint(
    path, guide, optimizer, epoch, history, metadata=None, *, keep_last=0, model=None
):
    """Writes guide and optimizer state, epoch, history, random state and metadata atomically,
    and the model's own state (batch norm's parameters and statistics) when it has one.

    Refuses to write non-finite parameters, so the file on disk is always the last good state.
    With ``keep_last=k`` the ``k`` previous files stay beside it as ``{name}.1`` (newest) to
    ``{name}.k``.

    Example::

        save_checkpoint("run/checkpoint.pt", guide, optimizer, epoch=3, history=records)
    """
    path = Path(path)
    guide_state = guide.state_dict()
    bad = non_finite_entries(guide_state)
    if bad:
        raise ValueError(
            f"not writing checkpoint {path}: the guide's {', '.join(bad)} hold non-finite values"
        )
    rng = {"cpu": torch.get_rng_state(), "cuda": []}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    state = {
        "format": FORMAT,
        "version": SCHEMA_VERSION,
        "guide": guide_state,
        "optimizer": optimizer.state_dict(),
        "epoch": int(epoch),
        "history": list(getattr(history, "epochs", history)),
        "rng": rng,
        "metadata": dict(metadata or {}),
    }
    model_state = {} if model is None else model.state_dict()
    if model_state:
        bad = non_finite_entries(model_state)
        if bad:
            raise ValueError(
                f"not writing checkpoint {path}: the model's {', '.join(bad)} hold non-finite "
                "values"
            )
        state["model"] = model_state
    state["sha256"] = _digest(state, path)
    if keep_last > 0 and path.is_file():
        _rotate(path, keep_last)
    torch_save_atomically(state, path)


def non_finite_entries(state_dict) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` that hold a NaN or infinity.

    One host synchronisation for the whole state, not one per tensor.

    Example::

        assert non_finite_entries(guide.state_dict()) == []
    """
    names = [k for k, v in state_dict.items() if torch.is_floating_point(v)]
    if not names:
        return []
    flags = [torch.isfinite(state_dict[k]).all() for k in names]
    finite = torch.stack([f.to(flags[0].device) for f in flags]).tolist()
    return [name for name, ok in zip(names, finite, strict=True) if not ok]


def load_checkpoint(path, guide=None, *, epochs: int | None = None) -> dict:
    """Reads and checks a checkpoint written by :func:`pyro_bc.fit` (tensors and plain data only).

    Checks the schema (keys and types, the random state's dtype), the SHA-256 digest (version 1),
    and, given ``guide``, that every tensor has the name and shape the guide expects (the guide's
    tensors are then on the guide's device); given ``epochs``, that the checkpoint's epoch is
    within ``0..epochs``.

    :raises FileNotFoundError: if ``path`` does not exist.
    :raises CheckpointError: naming the file and what is wrong.

    Example::

        guide.load_state_dict(load_checkpoint("run/checkpoint.pt", guide)["guide"])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({e}); it may be truncated, corrupted or hold code"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    version = state.get("version", 0)
    if version == 0:
        missing = [k for k in _LEGACY_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks {missing}: not written by pyro_bc.fit")
        state.setdefault("metadata", {})
        state["version"] = 0
        if isinstance(state["rng"], torch.Tensor):
            state["rng"] = {"cpu": state["rng"], "cuda": []}
    elif state.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path}: format {state.get('format')!r} is not a pyro_bc checkpoint"
        )
    elif version == SCHEMA_VERSION:
        _check_digest(state, path)
    elif isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has schema version {version}; this pyro_bc reads versions 0 to "
            f"{SCHEMA_VERSION}: upgrade pyro_bc"
        )
    else:
        raise CheckpointError(f"checkpoint {path} has an invalid schema version {version!r}")
    _check_schema(state, path, version)
    if epochs is not None and state["epoch"] > epochs:
        raise CheckpointError(
            f"checkpoint {path} is at epoch {state['epoch']}, past epochs={epochs}: pass "
            f"epochs >= {state['epoch']} to train on, or a new checkpoint path to start over"
        )
    if guide is not None:
        state["guide"] = _match_guide(state["guide"], guide, path)
    return state


def restore_rng_state(rng) -> None:
    """Sets torch's CPU (and, where there is CUDA, CUDA) random state from a checkpoint's ``rng``.

    Example::

        restore_rng_state(load_checkpoint(path)["rng"])
    """
    torch.set_rng_state(rng["cpu"])
    cuda = rng.get("cuda") or []
    if cuda and torch.cuda.is_available():
        # a run resumed on fewer devices restores those it has
        for device, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)


def _check_schema(state, path, version):
    def fail(what):
        raise CheckpointError(f"checkpoint {path} (schema version {version}): {what}")

    guide = state["guide"]
    if not isinstance(guide, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in guide.items()
    ):
        fail("'guide' must map names to tensors")
    optimizer = state["optimizer"]
    if not (
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("state"), dict)
        and isinstance(optimizer.get("param_groups"), list)
        and all(isinstance(g, dict) for g in optimizer["param_groups"])
    ):
        fail("'optimizer' is not an optimizer state dict (state, param_groups)")
    epoch = state["epoch"]
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        fail(f"'epoch' must be a non-negative integer, got {epoch!r}")
    history = state["history"]
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        fail("'history' must be a list of dicts, one per epoch")
    if version >= 1 and len(history) != epoch:
        fail(f"'history' has {len(history)} records for epoch {epoch}")
    rng = state["rng"]
    if not isinstance(rng, dict) or not isinstance(rng.get("cuda", []), list):
        fail("'rng' must be {'cpu': ByteTensor, 'cuda': [ByteTensor, ...]}")
    for name, value in [("cpu", rng.get("cpu"))] + [("cuda", s) for s in rng.get("cuda", [])]:
        if not isinstance(value, torch.Tensor) or value.dtype != torch.uint8 or value.dim() != 1:
            got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            fail(f"the {name} random state must be a 1-d uint8 tensor (ByteTensor), got {got}")
    if not isinstance(state["metadata"], dict):
        fail("'metadata' must be a dict")
    model = state.get("model", {})
    if not isinstance(model, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()
    ):
        fail("'model' must map names to tensors")


def _match_guide(saved, guide, path):
    expected = guide.state_dict()
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    wrong = [
        f"{k} {tuple(saved[k].shape)} (the guide's is {tuple(v.shape)})"
        for k, v in expected.items()
        if k in saved and saved[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"has unknown {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if wrong:
            parts.append(f"has shapes {', '.join(wrong[:5])}")
        raise CheckpointError(
            f"checkpoint {path} is not of this model: it {'; '.join(parts)}. Build the model and "
            "guide it was trained with (its 'metadata' may say which)"
        )
    return {
        k: saved[k].to(device=v.device, dtype=v.dtype, non_blocking=True)
        for k, v in expected.items()
    }


def _check_digest(state, path):
    recorded = state.get("sha256")
    if not isinstance(recorded, str):
        raise CheckpointError(f"checkpoint {path} has no SHA-256 digest")
    content = {k: v for k, v in state.items() if k != "sha256"}
    if _digest(content, path) != recorded:
        raise CheckpointError(
            f"checkpoint {path} fails its SHA-256 check: the file was changed or corrupted "
            "after it was written (resume from an older copy, or start over)"
        )


def _digest(state, path) -> str:
    digest = hashlib.sha256()
    _feed(digest, state, path, "checkpoint")
    return digest.hexdigest()


def _feed(digest, value, path, where):
    # Type tags and lengths make the byte stream unambiguous (no two states share one).
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"T{t.dtype}{tuple(value.shape)}:".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}:".encode())
        for k, v in value.items():
            _feed(digest, k, path, where)
            _feed(digest, v, path, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        digest.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}:".encode())
        for i, v in enumerate(value):
            _feed(digest, v, path, f"{where}[{i}]")
    elif isinstance(value, str):
        encoded = value.encode()
        digest.update(f"S{len(encoded)}:".encode() + encoded)
    elif isinstance(value, bool) or value is None:
        digest.update(f"{value!r};".encode())
    elif isinstance(value, int):
        digest.update(f"I{value};".encode())
    elif isinstance(value, float):
        digest.update(f"F{value.hex()};".encode())
    else:
        raise TypeError(
            f"checkpoint {path}: {where} is a {type(value).__name__}; checkpoints hold tensors "
            "and plain data (str, int, float, bool, None, lists, tuples, dicts)"
        )


def _rotate(path: Path, keep_last: int) -> None:
    copies = [path.with_name(f"{path.name}.{i}") for i in range(1, keep_last + 1)]
    for older, newer in reversed(list(zip(copies[1:], copies[:-1], strict=True))):
        if newer.exists():
            os.replace(newer, older)
    # a copy rather than a rename, so that the checkpoint itself never goes missing
    write_atomically(copies[0], path.read_bytes())
