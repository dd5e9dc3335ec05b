"""The ``.bc`` file: a thinned network's modules, bit-packed fixed-point weights, no pickle.

Layout (see :mod:`pyro_bc.codec.container`): a safetensors container whose metadata holds the
network's description (input shape, then each module's type and arguments) and a SHA-256 of the
description and data. Tensors: ``<layer>.weight`` holds a layer's fixed-point integers ``q``
(weights ``q 2^-t``) in two's complement at exactly the layer's width ``B`` (``"width"`` in the
layer's entry), packed most significant bit first in row-major order (``"U8"``); a layer kept in
float32 stores ``"F32"`` weights instead. ``<layer>.bias`` is float32 (biases are few and not
counted by the paper's accounting; keeping them exact costs 4 bytes each). ``<gather>.mask`` is a
packed bit mask over a :class:`~pyro_bc.gather.Gather`'s inputs. One entry per module type
(:mod:`pyro_bc.codec.modules`) says how each is written and read.

**Overhead against the paper's accounting** (``sum_l |W_l| (1 + e + t_l)`` bits): the header,
the float32 biases, the gather masks (one bit per input), the padding of each packed tensor to
whole bytes, and the difference between ``B_l`` and ``1 + e + t_l``. The compression report's
``file_layout`` gives the exact split.

**Reading is strict** and bounded: module types come from a fixed whitelist, every field is
validated, the values a file asks to allocate are capped (``max_parameters``, checked before
anything is allocated), tensors must sit exactly where the writer puts them, and the network's
shapes are traced on ``meta`` tensors before it is built. Any failure raises
:class:`CompressedFileError` naming the file and the problem.

Example::

    data, layout = encode(network.named_children(), (1, 28, 28), {"fc1": 5})
    modules, input_shape, formats = decode(data, source="lenet300.bc")
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict

import torch

from .bits import pack_bits, packed_size, unpack_bits
from .container import CompressedFileError, Container, is_int, write_container
from .modules import REGISTRY, codec_for

__all__ = [
    "CompressedFileError",
    "MAX_PARAMETERS",
    "decode",
    "encode",
    "pack_bits",
    "packed_size",
    "unpack_bits",
]

MAX_MODULES = 4096
#: The most values (weights, biases, gather indices) a file may ask to allocate unless the
#: caller raises it: 2^26, 256 MiB of float32 - a VGG-16 is 15 million.
MAX_PARAMETERS = 2**26
#: The largest activation (input included) of one example a file may ask for: 2^26 values.
MAX_ACTIVATION_NUMEL = 2**26
_NAME = re.compile(r"[A-Za-z0-9_]{1,200}")
_LAYOUT_KEYS = {"weight": "weights", "bias": "biases", "mask": "masks"}


def encode(modules, input_shape, formats) -> tuple[bytes, dict]:
    """The file's bytes for ``(name, module)`` pairs, and their split in bytes
    ``{"header", "weights", "biases", "masks"}``.

    ``formats`` maps each Linear/Conv2d's name to its fraction bits (None: float32).

    Example::

        data, layout = encode(network.named_children(), (784,), {"fc1": 5, "fc2": 6})
    """
    specs, tensors = [], []
    for name, module in modules:
        if not _NAME.fullmatch(name):
            raise ValueError(f"save: module name {name!r} must be 1-200 letters, digits or '_'")
        codec = codec_for(name, module)
        fields, module_tensors = codec.describe(name, module, formats)
        specs.append({"name": name, "type": codec.type_name, **fields})
        tensors += module_tensors
    description = json.dumps(
        {"input_shape": list(input_shape), "modules": specs}, separators=(",", ":")
    )
    data = write_container(description, tensors)
    layout = {"weights": 0, "biases": 0, "masks": 0}
    for key, _, _, raw in tensors:
        layout[_LAYOUT_KEYS[key.rsplit(".", 1)[1]]] += len(raw)
    layout = {"header": len(data) - sum(layout.values()), **layout}
    return data, layout


def decode(data: bytes, source: str = "<bytes>", max_parameters: int = MAX_PARAMETERS):
    """Reads a file's bytes: ``(modules, input_shape, formats)``, modules an ``OrderedDict``.

    :param source: names the file in errors.
    :param max_parameters: the most values the file may ask to allocate
        (:data:`MAX_PARAMETERS` by default); raise it for a larger network you trust.
    :raises CompressedFileError: for anything that is not a valid file.

    Example::

        modules, input_shape, formats = decode(path.read_bytes(), source=str(path))
    """
    container = Container(bytes(data), source)
    description = container.json(container.network, "network")
    if not isinstance(description, dict) or set(description) != {"input_shape", "modules"}:
        raise container.error("the network description needs exactly input_shape and modules")
    input_shape = _input_shape(container, description["input_shape"])
    specs = description["modules"]
    if not isinstance(specs, list) or not 1 <= len(specs) <= MAX_MODULES:
        raise container.error(f"modules must be a list of 1 to {MAX_MODULES} modules")
    expected, values = [], {}
    for i, spec in enumerate(specs):
        codec = _check_spec(container, i, spec)
        try:
            expected += codec.tensors(spec)
        except ValueError as e:
            raise container.error(f"module {spec['name']!r} ({spec['type']}): {e}") from None
        values[spec["name"]] = codec.parameters(spec)
    if sum(values.values()) > max_parameters:
        largest = max(values, key=values.get)
        raise container.error(
            f"the network asks for {sum(values.values()):,} values (module {largest!r} alone "
            f"{values[largest]:,}), more than max_parameters={max_parameters:,}; if you trust "
            "this file, load it with a larger max_parameters"
        )
    container.check_tensors(expected)
    _trace(container, specs, input_shape)
    modules, formats = OrderedDict(), {}
    for spec in specs:
        modules[spec["name"]] = REGISTRY[spec["type"]].build(spec, container)
        if "frac_bits" in spec:
            formats[spec["name"]] = spec["frac_bits"]
    return modules, input_shape, formats


def _input_shape(container, shape):
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= 3
        or not all(is_int(s, 1, 2**31 - 1) for s in shape)
        or math.prod(shape) > MAX_ACTIVATION_NUMEL
    ):
        raise container.error(
            f"input_shape {shape!r} must be 1 to 3 positive sizes holding at most "
            f"{MAX_ACTIVATION_NUMEL:,} values"
        )
    return tuple(shape)


def _check_spec(container, i, spec):
    """Validates one module's description; returns its registry entry."""
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise container.error(f"module {i} is not an object with a type")
    kind, name = spec["type"], spec.get("name")
    if kind not in REGISTRY:
        raise container.error(
            f"module {i} has type {kind!r}, which a pyro_bc file cannot hold; allowed: "
            f"{', '.join(REGISTRY)}"
        )
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise container.error(f"module {i} ({kind}) needs a name of letters, digits and '_'")
    codec = REGISTRY[kind]
    if set(spec) != {"name", "type", *codec.fields}:
        raise container.error(
            f"module {name!r} ({kind}) needs exactly the fields {sorted(codec.fields)}, got "
            f"{sorted(set(spec) - {'name', 'type'})}"
        )
    for key, check in codec.fields.items():
        if not check(spec[key]):
            raise container.error(f"module {name!r} ({kind}): invalid {key} {spec[key]!r}")
    return codec


def _trace(container, specs, input_shape):
    """Runs the network on a meta tensor: checks that the shapes fit, allocating nothing."""
    x = torch.empty(1, *input_shape, device="meta")
    names = set()
    for spec in specs:
        if spec["name"] in names:
            raise container.error(f"two modules are named {spec['name']!r}")
        names.add(spec["name"])
        try:
            x = REGISTRY[spec["type"]].meta_forward(spec, x)
        except (RuntimeError, ValueError, IndexError, OverflowError, TypeError) as e:
            raise container.error(
                f"module {spec['name']!r} ({spec['type']}) cannot take an input of shape "
                f"{tuple(x.shape[1:])}: {e}"
            ) from None
        if x.numel() > MAX_ACTIVATION_NUMEL:
            raise container.error(
                f"module {spec['name']!r} ({spec['type']}) outputs {x.numel():,} values per "
                f"example, more than the limit {MAX_ACTIVATION_NUMEL:,}"
            )
