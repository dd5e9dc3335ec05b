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
import zipfile
from pathlib import Path

import torch

from .checks import is_integer
from .files import torch_save_atomically, write_atomically

FORMAT = "pyro_bc.checkpoint"
#: the schema :func:`save_checkpoint` writes; :func:`load_checkpoint` reads it and version 0
SCHEMA_VERSION = 1
_LEGACY_KEYS = ("guide", "optimizer", "epoch", "history", "rng")
#: The most values (containers, tensors, scalars) the digest visits: a small pickle whose lists
#: share one another would otherwise describe 2^100 of them.
MAX_DIGEST_VALUES = 2**20


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
    state = {
        "format": FORMAT,
        "version": SCHEMA_VERSION,
        "guide": guide_state,
        "optimizer": optimizer.state_dict(),
        "epoch": int(epoch),
        "history": list(getattr(history, "epochs", history)),
        "rng": rng_state(),
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
    if path.is_dir():
        raise IsADirectoryError(
            f"checkpoint {path} is a directory; pass the checkpoint file (pyro-bc run writes "
            "checkpoint.pt in its output directory)"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    _check_archive(path)
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({e}); it may be truncated, corrupted or hold code"
        ) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    version = state.get("version", 0)
    if type(version) is not int:  # also no bool, float or tensor standing in for a number
        raise CheckpointError(f"checkpoint {path} has an invalid schema version {version!r}")
    if version == 0:
        missing = [k for k in _LEGACY_KEYS if k not in state]
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks {missing}: not written by pyro_bc.fit")
        # the keys of the first format exactly: a damaged key of a newer file (its version or
        # digest) must not pass it off as a legacy one, which has no digest to check
        unknown = sorted(set(state) - {*_LEGACY_KEYS, "metadata"})
        if unknown:
            raise CheckpointError(
                f"checkpoint {path} has no schema version but holds {unknown}: it is damaged"
            )
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
    elif version > SCHEMA_VERSION:
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


def rng_state() -> dict:
    """Torch's CPU random state and, where CUDA is in use, every device's (``"cpu"``, ``"cuda"``).

    Example::

        state = rng_state()
        torch.randn(3)
        restore_rng_state(state)  # the same three numbers again
    """
    rng = {"cpu": torch.get_rng_state(), "cuda": []}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


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


def _check_archive(path):
    # torch.save stores its entries uncompressed: entries that inflate past the file's own size
    # are a zip bomb (a 260 KB file can hold gigabytes of zeros)
    try:
        with zipfile.ZipFile(path) as archive:
            inflated = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return  # not a readable zip archive: torch.load says why
    size = path.stat().st_size
    if inflated > size:
        raise CheckpointError(
            f"checkpoint {path} inflates to {inflated:,} bytes from {size:,}: torch.save never "
            "compresses, so it was not written by pyro_bc.fit (or is a decompression bomb)"
        )


def _dense(value):
    return (
        isinstance(value, torch.Tensor)
        and value.layout == torch.strided
        and not value.is_nested
        and not value.is_quantized
        and value.device.type == "cpu"
    )


def _check_schema(state, path, version):
    def fail(what):
        raise CheckpointError(f"checkpoint {path} (schema version {version}): {what}")

    missing = [k for k in (*_LEGACY_KEYS, "metadata") if k not in state]
    if missing:
        fail(f"it lacks {missing}")
    guide = state["guide"]
    if not isinstance(guide, dict) or not all(
        isinstance(k, str) and _dense(v) for k, v in guide.items()
    ):
        fail("'guide' must map names to tensors (dense ones)")
    if not all(v.is_floating_point() for v in guide.values()):
        fail("the guide's parameters must be floating-point tensors")
    bad = non_finite_entries(guide)
    if bad:
        fail(f"the guide's {', '.join(bad[:5])} hold non-finite values")
    optimizer = state["optimizer"]
    if not (
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("state"), dict)
        and isinstance(optimizer.get("param_groups"), list)
        and all(isinstance(g, dict) for g in optimizer["param_groups"])
    ):
        fail("'optimizer' is not an optimizer state dict (state, param_groups)")
    epoch = state["epoch"]
    if not (is_integer(epoch) and epoch >= 0):
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
        if not _dense(value) or value.dtype != torch.uint8 or value.dim() != 1:
            got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            fail(f"the {name} random state must be a 1-d uint8 tensor (ByteTensor), got {got}")
    try:  # the size a CPU generator's state must have depends on torch, so ask torch
        torch.Generator().set_state(rng["cpu"])
    except RuntimeError as e:
        fail(f"the cpu random state cannot be restored ({e})")
    if not isinstance(state["metadata"], dict):
        fail("'metadata' must be a dict")
    model = state.get("model", {})
    if not isinstance(model, dict) or not all(
        isinstance(k, str) and _dense(v) for k, v in model.items()
    ):
        fail("'model' must map names to tensors (dense ones)")
    bad = non_finite_entries(model)
    if bad:
        fail(f"the model's {', '.join(bad[:5])} hold non-finite values")


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
    try:
        digest = _digest(content, path, budget=[MAX_DIGEST_VALUES])
    except (TypeError, RuntimeError, NotImplementedError, RecursionError) as e:
        # what no pyro_bc checkpoint holds: other types, sparse or meta tensors, deep nesting
        raise CheckpointError(f"checkpoint {path} cannot be checked: {e}") from None
    if digest != recorded:
        raise CheckpointError(
            f"checkpoint {path} fails its SHA-256 check: the file was changed or corrupted "
            "after it was written (resume from an older copy, or start over)"
        )


def _digest(state, path, budget=None) -> str:
    digest = hashlib.sha256()
    _feed(digest, state, path, "checkpoint", budget)
    return digest.hexdigest()


def _feed(digest, value, path, where, budget=None):
    # Type tags and lengths make the byte stream unambiguous (no two states share one).
    if budget is not None:
        budget[0] -= 1
        if budget[0] < 0:
            raise RuntimeError(f"it holds more than {MAX_DIGEST_VALUES:,} values")
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"T{t.dtype}{tuple(value.shape)}:".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f"D{len(value)}:".encode())
        for k, v in value.items():
            _feed(digest, k, path, where, budget)
            _feed(digest, v, path, f"{where}[{k!r}]", budget)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}:".encode())
        for i, v in enumerate(value):
            _feed(digest, v, path, f"{where}[{i}]", budget)
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
