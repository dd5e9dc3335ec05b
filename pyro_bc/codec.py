"""Bit-packed fixed-point storage of a :class:`~pyro_bc.compress.CompressedNetwork`; no pickle.

A file is a safetensors container (``safetensors.numpy.load_file`` reads it) written and read by
this module's own strict code:

- 8 bytes: the header's length ``N``, little-endian;
- ``N`` bytes: a JSON header, padded with spaces to a multiple of 8. ``"__metadata__"`` holds
  ``format`` (``"pyro_bc.compressed"``), ``version`` (``"1"``), ``network`` (a JSON string: the
  input shape and the modules, in order, each a dict of its type and arguments) and ``sha256``
  (of the network string followed by the data section); every other entry describes one tensor
  (``dtype``, ``shape``, ``data_offsets``), as in safetensors;
- the data section: the tensors' bytes back to back, float32 tensors first, each group in
  module order.

Tensors: ``<layer>.weight`` holds a layer's fixed-point integers ``q`` (weights ``q 2^-t``) in
two's complement at exactly the layer's width ``B`` (``"width"`` in the layer's entry), packed
most significant bit first in row-major order, the last byte padded with zeros (``"U8"``); a layer
kept in float32 stores ``"F32"`` weights instead. ``<layer>.bias`` is float32 (biases are few -
410 in LeNet-300-100 - and not counted by the paper; keeping them exact costs 4 bytes each).
``<gather>.mask`` is a packed bit mask over a :class:`~pyro_bc.compress.Gather`'s inputs.

**Overhead against the paper's accounting** (``sum_l |W_l| (1 + e + t_l)`` bits): the header
(about 1 KB for LeNet-300-100; the 8-byte length, JSON and padding), the float32 biases, the
gather masks (one bit per input of a Gather: 98 bytes for MNIST's 784 pixels), the padding of each
packed tensor to whole bytes, and the difference between ``B_l`` and ``1 + e + t_l`` (``B_l``
is often smaller: the integer bits come from the layer's largest weight, and a fixed-point
format needs no exponent). :attr:`CompressionReport.file_layout` gives the exact split.

**Reading is strict.** A file is data, never code: the module types come from a fixed whitelist
(:data:`MODULE_TYPES`), every size is checked against the file's length before anything is
allocated, tensors must sit exactly where the writer puts them, the checksum covers the
network and the data, and the network's shapes are traced on meta tensors before it is built.
Any failure raises :class:`CompressedFileError` (a ``ValueError``) naming the file and the
problem.

Example::

    compressed = pyro_bc.compress(guide)
    compressed.save("lenet300.bc")
    same = pyro_bc.load("lenet300.bc")
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .compress import (
    MAX_FRACTION_BITS,
    MAX_WIDTH,
    CompressedNetwork,
    Gather,
    dequantize,
    fixed_point_width,
)
from .files import write_atomically

FORMAT = "pyro_bc.compressed"
VERSION = "1"
#: Whitelist of the module types a file may hold.
MODULE_TYPES = (
    "Linear",
    "Conv2d",
    "ReLU",
    "LeakyReLU",
    "Tanh",
    "MaxPool2d",
    "AvgPool2d",
    "Flatten",
    "Gather",
)
MAX_HEADER_BYTES = 16 * 2**20
MAX_MODULES = 4096
MAX_SIZE = 2**31 - 1  # any one count (features, channels, kernel size, ...)
#: The largest activation (input included) of one example a file may ask for: 2^26 float32
#: values, 256 MiB; far above any network compress thins, far below a lying header's demands.
MAX_ACTIVATION_NUMEL = 2**26
_CHUNK = 2**20  # values packed at once; a multiple of 8 keeps chunks byte-aligned
_NAME = re.compile(r"[A-Za-z0-9_]{1,200}")
_ITEMSIZE = {"U8": 1, "F32": 4}


class CompressedFileError(ValueError):
    """A file that is not a valid pyro_bc compressed network (truncated, corrupted, hostile).

    Example::

        try:
            network = pyro_bc.load("download.bc")
        except CompressedFileError as e:  # also a ValueError
            print(e)  # "download.bc: the checksum does not match ..."
    """


# ---------------------------------------------------------------------------------------------
# Bit packing


def pack_bits(q: np.ndarray, width: int) -> bytes:
    """Packs integers ``q`` as ``width``-bit two's complement, most significant bit first.

    Example::

        pack_bits(np.array([1, -3]), 3)  # 001 101 -> b'4' (0b00110100)
    """
    q = np.ascontiguousarray(q, dtype=np.int64).ravel()
    shifts = np.arange(width - 1, -1, -1, dtype=np.uint64)
    chunks = []
    for start in range(0, len(q), _CHUNK):
        u = q[start : start + _CHUNK].view(np.uint64)  # two's complement, then keep `width` bits
        bits = ((u[:, None] >> shifts) & np.uint64(1)).astype(np.uint8)
        chunks.append(np.packbits(bits.ravel()))
    return b"".join(c.tobytes() for c in chunks)


def unpack_bits(data: bytes, count: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``count`` signed integers of ``width`` bits (int64).

    Example::

        unpack_bits(pack_bits(np.array([1, -3]), 3), 2, 3)  # array([ 1, -3])
    """
    raw = np.frombuffer(data, dtype=np.uint8)
    weights = np.left_shift(np.uint64(1), np.arange(width - 1, -1, -1, dtype=np.uint64))
    out = np.empty(count, dtype=np.int64)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        first = start * width // 8
        bits = np.unpackbits(raw[first : first + math.ceil(n * width / 8)], count=n * width)
        u = bits.reshape(n, width).astype(np.uint64) @ weights
        negative = (u >> np.uint64(width - 1)) & np.uint64(1)
        out[start : start + n] = u.astype(np.int64) - (negative.astype(np.int64) << width)
    return out


def _packed_size(count, width):
    return (count * width + 7) // 8


# ---------------------------------------------------------------------------------------------
# Writing


def save(network: CompressedNetwork, path) -> int:
    """Writes ``network`` to ``path`` atomically (temporary file, then rename); returns its size.

    Example::

        pyro_bc.codec.save(compressed, "lenet300.bc")
    """
    data = encode(network)
    write_atomically(path, data)
    return len(data)


def encode(network: CompressedNetwork) -> bytes:
    """The bytes of ``network``'s file (what :func:`save` writes).

    Example::

        data = pyro_bc.codec.encode(compressed)
    """
    return _encode(network)[0]


def _encode(network):
    """The file's bytes and their split ``{"header", "weights", "biases", "masks"}`` in bytes."""
    if not isinstance(network, CompressedNetwork) or network.input_shape is None:
        raise ValueError(
            "save: expected a CompressedNetwork from pyro_bc.compress (with an input_shape), "
            f"got {type(network).__name__}"
        )
    specs, tensors = [], []
    for name, module in network.named_children():
        spec, module_tensors = _module_spec(name, module, network.formats)
        specs.append(spec)
        tensors += module_tensors
    description = json.dumps(
        {"input_shape": list(network.input_shape), "modules": specs}, separators=(",", ":")
    )
    # float32 tensors first keeps them 4-byte aligned, as safetensors readers expect
    tensors.sort(key=lambda t: t[1] != "F32")
    data = b"".join(t[3] for t in tensors)
    header = {
        "__metadata__": {
            "format": FORMAT,
            "version": VERSION,
            "network": description,
            "sha256": hashlib.sha256(description.encode() + data).hexdigest(),
        }
    }
    offset = 0
    for key, dtype, shape, raw in tensors:
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    layout = {"header": 8 + len(text), "weights": 0, "biases": 0, "masks": 0}
    for key, _, _, raw in tensors:
        layout[{"weight": "weights", "bias": "biases", "mask": "masks"}[key.split(".")[1]]] += len(
            raw
        )
    return len(text).to_bytes(8, "little") + text + data, layout


def _module_spec(name, module, formats):
    """The JSON description of one module and its tensors ``(key, dtype, shape, bytes)``."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"save: module name {name!r} must be 1-200 letters, digits or '_'")
    spec = {"name": name}
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        return _layer_spec(name, module, formats, spec)
    if isinstance(module, Gather):
        spec.update(type="Gather", in_features=module.in_features, out_features=module.out_features)
        mask = np.zeros(module.in_features, dtype=np.uint8)
        mask[module.index.numpy()] = 1
        if int(mask.sum()) != module.out_features:
            raise ValueError(f"save: Gather {name!r} must select distinct, increasing inputs")
        if not (module.index[1:] > module.index[:-1]).all():
            raise ValueError(f"save: Gather {name!r} must select distinct, increasing inputs")
        packed = np.packbits(mask).tobytes()
        return spec, [(f"{name}.mask", "U8", [len(packed)], packed)]
    if isinstance(module, (nn.ReLU, nn.Tanh)):
        spec["type"] = type(module).__name__
    elif isinstance(module, nn.LeakyReLU):
        spec.update(type="LeakyReLU", negative_slope=float(module.negative_slope))
    elif isinstance(module, nn.MaxPool2d) and not module.return_indices:
        spec.update(
            type="MaxPool2d",
            kernel_size=_pair(module.kernel_size),
            stride=_pair(module.stride),
            padding=_pair(module.padding),
            dilation=_pair(module.dilation),
            ceil_mode=bool(module.ceil_mode),
        )
    elif isinstance(module, nn.AvgPool2d):
        spec.update(
            type="AvgPool2d",
            kernel_size=_pair(module.kernel_size),
            stride=_pair(module.stride),
            padding=_pair(module.padding),
            ceil_mode=bool(module.ceil_mode),
            count_include_pad=bool(module.count_include_pad),
            divisor_override=module.divisor_override,
        )
    elif isinstance(module, nn.Flatten) and (module.start_dim, module.end_dim) == (1, -1):
        spec["type"] = "Flatten"
    else:
        raise ValueError(
            f"save: module {name!r} ({type(module).__name__}) cannot be stored; a file holds "
            f"only {', '.join(MODULE_TYPES)} (Flatten(1, -1), MaxPool2d without indices)"
        )
    return spec, []


def _layer_spec(name, module, formats, spec):
    if name not in formats:
        raise ValueError(f"save: layer {name!r} has no number format in network.formats")
    t = formats[name]
    weight = module.weight.detach().cpu().float()
    if isinstance(module, nn.Linear):
        spec.update(type="Linear", in_features=module.in_features, out_features=module.out_features)
    else:
        if module.groups != 1 or module.padding_mode != "zeros":
            raise ValueError(f"save: Conv2d {name!r} must have groups=1 and zero padding")
        padding = module.padding if isinstance(module.padding, str) else _pair(module.padding)
        spec.update(
            type="Conv2d",
            in_channels=module.in_channels,
            out_channels=module.out_channels,
            kernel_size=_pair(module.kernel_size),
            stride=_pair(module.stride),
            padding=padding,
            dilation=_pair(module.dilation),
        )
    spec.update(bias=module.bias is not None, frac_bits=t)
    if t is None:
        spec["width"] = None
        tensors = [(f"{name}.weight", "F32", list(weight.shape), _f32_bytes(weight))]
    else:
        scaled = weight.double() * 2.0**t
        q = scaled.round()
        if not torch.equal(q, scaled) or not torch.isfinite(weight).all():
            raise ValueError(
                f"save: the weights of layer {name!r} are not on its grid 2^-{t}; they changed "
                "after compress. Compress again (or set network.formats[name] = None to store "
                "float32)."
            )
        q = q.long()
        width = fixed_point_width(q)
        if width > MAX_WIDTH:
            raise ValueError(f"save: layer {name!r} needs {width} > {MAX_WIDTH} bits per weight")
        spec["width"] = width
        packed = pack_bits(q.numpy(), width)
        tensors = [(f"{name}.weight", "U8", [len(packed)], packed)]
    if module.bias is not None:
        bias = module.bias.detach().cpu().float()
        tensors.append((f"{name}.bias", "F32", [bias.numel()], _f32_bytes(bias)))
    return spec, tensors


def _f32_bytes(tensor):
    return tensor.contiguous().numpy().astype("<f4").tobytes()


def _pair(value):
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * 2


# ---------------------------------------------------------------------------------------------
# Reading


def load(path) -> CompressedNetwork:
    """Reads a network written by :meth:`CompressedNetwork.save`; its outputs are bit-identical.

    :raises CompressedFileError: (a ``ValueError``) if the file is truncated, corrupted or not a
        pyro_bc compressed network; the message names the file and the problem.

    Example::

        compressed = pyro_bc.load("lenet300.bc")
        logits = compressed(x)
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"compressed network {path} does not exist")
    return decode(path.read_bytes(), source=str(path))


def decode(data: bytes, source: str = "<bytes>") -> CompressedNetwork:
    """Reads a network from the bytes of a file (see :func:`load`); ``source`` names it in errors.

    Example::

        same = pyro_bc.codec.decode(compressed.to_bytes())
    """
    reader = _Reader(bytes(data), source)
    return reader.network()


class _Reader:
    def __init__(self, data, source):
        self.data = data
        self.source = source

    def error(self, message):
        return CompressedFileError(f"{self.source}: {message}")

    def network(self):
        metadata, table, buffer = self._container()
        description = self._json(metadata["network"].encode("utf-8", "surrogatepass"), "network")
        if not isinstance(description, dict) or set(description) != {"input_shape", "modules"}:
            raise self.error("the network description needs exactly input_shape and modules")
        input_shape = self._input_shape(description["input_shape"])
        specs = description["modules"]
        if not isinstance(specs, list) or not 1 <= len(specs) <= MAX_MODULES:
            raise self.error(f"modules must be a list of 1 to {MAX_MODULES} modules")
        expected = []
        for i, spec in enumerate(specs):
            expected += self._check_spec(i, spec)
        self._check_table(table, expected, len(buffer))
        self._trace(specs, input_shape)
        modules, formats = OrderedDict(), {}
        for spec in specs:
            modules[spec["name"]] = self._build(spec, table, buffer)
            if spec["type"] in ("Linear", "Conv2d"):
                formats[spec["name"]] = spec["frac_bits"]
        network = CompressedNetwork(modules, input_shape=input_shape, formats=formats)
        return network.eval()

    # -- the container ------------------------------------------------------------------------

    def _container(self):
        data = self.data
        if len(data) < 8:
            raise self.error(
                f"the file has {len(data)} bytes, too few for a header: it is truncated or not "
                "a pyro_bc compressed network"
            )
        size = int.from_bytes(data[:8], "little")
        if size > len(data) - 8 or size > MAX_HEADER_BYTES:
            raise self.error(
                f"the header claims {size:,} bytes but the file holds {len(data) - 8:,} after "
                f"the length field (limit {MAX_HEADER_BYTES:,}): it is truncated or corrupted"
            )
        header = self._json(data[8 : 8 + size], "header")
        if not isinstance(header, dict):
            raise self.error("the header is not a JSON object")
        metadata = header.pop("__metadata__", None)
        keys = {"format", "version", "network", "sha256"}
        if (
            not isinstance(metadata, dict)
            or set(metadata) != keys
            or not all(isinstance(v, str) for v in metadata.values())
        ):
            raise self.error(f"the header's __metadata__ must hold the strings {sorted(keys)}")
        if metadata["format"] != FORMAT:
            raise self.error(f"format is {metadata['format']!r}, not {FORMAT!r}")
        if metadata["version"] != VERSION:
            raise self.error(
                f"format version {metadata['version']!r} is not {VERSION!r}; this pyro_bc "
                "cannot read it (upgrade pyro_bc or compress again)"
            )
        buffer = data[8 + size :]
        digest = hashlib.sha256(metadata["network"].encode("utf-8", "surrogatepass") + buffer)
        if digest.hexdigest() != metadata["sha256"]:
            raise self.error(
                "the checksum does not match the network and data: the file is corrupted "
                "or truncated"
            )
        return metadata, self._table(header, len(buffer)), buffer

    def _json(self, raw, what):
        try:
            return json.loads(
                raw.decode("utf-8"),
                object_pairs_hook=_unique_keys,
                parse_constant=_reject_constant,
            )
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self.error(f"the {what} is not valid JSON ({e})") from None

    def _table(self, header, data_size):
        table = {}
        for key, entry in header.items():
            if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
                raise self.error(f"tensor {key!r} needs exactly dtype, shape and data_offsets")
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            if dtype not in _ITEMSIZE:
                raise self.error(
                    f"tensor {key!r} has dtype {dtype!r}; a pyro_bc file holds only U8 and F32"
                )
            if not isinstance(shape, list) or not all(_is_int(s, 0, MAX_SIZE) for s in shape):
                raise self.error(f"tensor {key!r} has an invalid shape {shape!r}")
            if (
                not isinstance(offsets, list)
                or len(offsets) != 2
                or not all(_is_int(o, 0, data_size) for o in offsets)
                or offsets[0] > offsets[1]
            ):
                raise self.error(
                    f"tensor {key!r} has data_offsets {offsets!r} outside the data section of "
                    f"{data_size:,} bytes: the file is truncated or corrupted"
                )
            if math.prod(shape) * _ITEMSIZE[dtype] != offsets[1] - offsets[0]:
                raise self.error(
                    f"tensor {key!r}: shape {shape} of {dtype} does not fill data_offsets {offsets}"
                )
            table[key] = (dtype, shape, offsets)
        return table

    def _check_table(self, table, expected, data_size):
        """The tensors must be exactly those the modules need, where the writer puts them."""
        names = [key for key, _, _ in expected]
        if set(table) != set(names):
            missing, extra = set(names) - set(table), set(table) - set(names)
            raise self.error(
                f"the tensors do not match the modules (missing {sorted(missing)}, unexpected "
                f"{sorted(extra)})"
            )
        expected.sort(key=lambda item: item[1] != "F32")
        offset = 0
        for key, dtype, shape in expected:
            have = table[key]
            if have[0] != dtype or have[1] != shape:
                raise self.error(
                    f"tensor {key!r} is {have[0]} {have[1]}, but its module needs {dtype} {shape}"
                )
            if have[2] != [offset, offset + math.prod(shape) * _ITEMSIZE[dtype]]:
                raise self.error(f"tensor {key!r} is not where a pyro_bc file puts it")
            offset = have[2][1]
        if offset != data_size:
            raise self.error(f"the data section has {data_size - offset:,} unused bytes")

    # -- the modules --------------------------------------------------------------------------

    def _input_shape(self, shape):
        if (
            not isinstance(shape, list)
            or not 1 <= len(shape) <= 3
            or not all(_is_int(s, 1, MAX_SIZE) for s in shape)
            or math.prod(shape) > MAX_ACTIVATION_NUMEL
        ):
            raise self.error(
                f"input_shape {shape!r} must be 1 to 3 positive sizes holding at most "
                f"{MAX_ACTIVATION_NUMEL:,} values"
            )
        return tuple(shape)

    def _check_spec(self, i, spec):
        """Validates one module's description; returns the tensors it needs."""
        if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
            raise self.error(f"module {i} is not an object with a type")
        kind, name = spec["type"], spec.get("name")
        if kind not in MODULE_TYPES:
            raise self.error(
                f"module {i} has type {kind!r}, which a pyro_bc file cannot hold; allowed: "
                f"{', '.join(MODULE_TYPES)}"
            )
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise self.error(f"module {i} ({kind}) needs a name of letters, digits and '_'")
        fields = _FIELDS[kind]
        if set(spec) != {"name", "type", *fields}:
            raise self.error(
                f"module {name!r} ({kind}) needs exactly the fields {sorted(fields)}, got "
                f"{sorted(set(spec) - {'name', 'type'})}"
            )
        for key, check in fields.items():
            if not check(spec[key]):
                raise self.error(f"module {name!r} ({kind}): invalid {key} {spec[key]!r}")
        return self._tensors_of(spec)

    def _tensors_of(self, spec):
        name, kind = spec["name"], spec["type"]
        if kind == "Gather":
            if spec["out_features"] > spec["in_features"]:
                raise self.error(f"Gather {name!r} selects more inputs than it has")
            return [(f"{name}.mask", "U8", [_packed_size(spec["in_features"], 1)])]
        if kind not in ("Linear", "Conv2d"):
            return []
        count = math.prod(_weight_shape(spec))
        t, width = spec["frac_bits"], spec["width"]
        if (t is None) != (width is None):
            raise self.error(f"layer {name!r}: frac_bits and width must both be set or null")
        if t is None:
            tensors = [(f"{name}.weight", "F32", _weight_shape(spec))]
        else:
            tensors = [(f"{name}.weight", "U8", [_packed_size(count, width)])]
        if spec["bias"]:
            tensors.append((f"{name}.bias", "F32", [_weight_shape(spec)[0]]))
        return tensors

    def _trace(self, specs, input_shape):
        """Runs the network on a meta tensor: checks that the shapes fit, allocating nothing."""
        x = torch.empty(1, *input_shape, device="meta")
        names = set()
        for spec in specs:
            if spec["name"] in names:
                raise self.error(f"two modules are named {spec['name']!r}")
            names.add(spec["name"])
            try:
                x = _meta_forward(spec, x)
            except (RuntimeError, ValueError, IndexError, OverflowError) as e:
                raise self.error(
                    f"module {spec['name']!r} ({spec['type']}) cannot take an input of shape "
                    f"{tuple(x.shape[1:])}: {e}"
                ) from None
            if x.numel() > MAX_ACTIVATION_NUMEL:
                raise self.error(
                    f"module {spec['name']!r} ({spec['type']}) outputs {x.numel():,} values per "
                    f"example, more than the limit {MAX_ACTIVATION_NUMEL:,}"
                )

    def _build(self, spec, table, buffer):
        name, kind = spec["name"], spec["type"]

        def raw(key):
            begin, end = table[key][2]
            return buffer[begin:end]

        if kind == "Gather":
            mask = np.unpackbits(np.frombuffer(raw(f"{name}.mask"), np.uint8))
            index = np.flatnonzero(mask[: spec["in_features"]])
            if len(index) != spec["out_features"] or mask[spec["in_features"] :].any():
                raise self.error(f"Gather {name!r}: its mask does not select out_features inputs")
            return Gather(torch.from_numpy(index), spec["in_features"])
        if kind in ("Linear", "Conv2d"):
            return self._layer(spec, raw)
        return _simple_module(spec)

    def _layer(self, spec, raw):
        name, shape = spec["name"], _weight_shape(spec)
        if spec["frac_bits"] is None:
            weight = torch.from_numpy(np.frombuffer(raw(f"{name}.weight"), "<f4").copy())
        else:
            q = unpack_bits(raw(f"{name}.weight"), math.prod(shape), spec["width"])
            weight = dequantize(torch.from_numpy(q), spec["frac_bits"])
        if spec["type"] == "Linear":
            layer = nn.utils.skip_init(nn.Linear, shape[1], shape[0], bias=spec["bias"])
        else:
            padding = spec["padding"]
            layer = nn.utils.skip_init(
                nn.Conv2d,
                shape[1],
                shape[0],
                tuple(spec["kernel_size"]),
                stride=tuple(spec["stride"]),
                padding=padding if isinstance(padding, str) else tuple(padding),
                dilation=tuple(spec["dilation"]),
                bias=spec["bias"],
            )
        with torch.no_grad():
            layer.weight.copy_(weight.reshape(shape))
            if spec["bias"]:
                bias = np.frombuffer(raw(f"{name}.bias"), "<f4").copy()
                layer.bias.copy_(torch.from_numpy(bias))
        return layer


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed")


def _is_int(value, low, high):
    return type(value) is int and low <= value <= high


def _size(value):
    return _is_int(value, 1, MAX_SIZE)


def _pair_of(low):
    return lambda v: (
        isinstance(v, list) and len(v) == 2 and all(_is_int(x, low, MAX_SIZE) for x in v)
    )


def _flag(value):
    return type(value) is bool


def _frac_bits(value):
    return value is None or _is_int(value, 0, MAX_FRACTION_BITS)


def _width(value):
    return value is None or _is_int(value, 1, MAX_WIDTH)


def _padding(value):
    return value in ("same", "valid") or _pair_of(0)(value)


def _slope(value):
    return type(value) in (int, float) and math.isfinite(value)


_LAYER = {"bias": _flag, "frac_bits": _frac_bits, "width": _width}
_FIELDS = {
    "Linear": {"in_features": _size, "out_features": _size, **_LAYER},
    "Conv2d": {
        "in_channels": _size,
        "out_channels": _size,
        "kernel_size": _pair_of(1),
        "stride": _pair_of(1),
        "padding": _padding,
        "dilation": _pair_of(1),
        **_LAYER,
    },
    "ReLU": {},
    "Tanh": {},
    "LeakyReLU": {"negative_slope": _slope},
    "MaxPool2d": {
        "kernel_size": _pair_of(1),
        "stride": _pair_of(1),
        "padding": _pair_of(0),
        "dilation": _pair_of(1),
        "ceil_mode": _flag,
    },
    "AvgPool2d": {
        "kernel_size": _pair_of(1),
        "stride": _pair_of(1),
        "padding": _pair_of(0),
        "ceil_mode": _flag,
        "count_include_pad": _flag,
        "divisor_override": lambda v: v is None or _size(v),
    },
    "Flatten": {},
    "Gather": {"in_features": _size, "out_features": _size},
}


def _weight_shape(spec):
    if spec["type"] == "Linear":
        return [spec["out_features"], spec["in_features"]]
    return [spec["out_channels"], spec["in_channels"], *spec["kernel_size"]]


def _meta_forward(spec, x):
    kind = spec["type"]
    if kind in ("Linear", "Conv2d"):
        weight = torch.empty(_weight_shape(spec), device="meta")
        if kind == "Linear":
            if x.dim() != 2 or x.shape[1] != spec["in_features"]:
                raise ValueError(f"Linear needs ({spec['in_features']},) features")
            return F.linear(x, weight)
        if x.dim() != 4 or x.shape[1] != spec["in_channels"]:
            raise ValueError(f"Conv2d needs ({spec['in_channels']}, height, width)")
        return F.conv2d(x, weight, None, spec["stride"], spec["padding"], spec["dilation"])
    if kind == "Gather":
        if x.dim() != 2 or x.shape[1] != spec["in_features"]:
            raise ValueError(f"Gather needs ({spec['in_features']},) features")
        return x[:, : spec["out_features"]]
    if kind in ("MaxPool2d", "AvgPool2d") and x.dim() != 4:
        raise ValueError(f"{kind} needs (channels, height, width)")
    return _simple_module(spec)(x)


def _simple_module(spec):
    kind = spec["type"]
    if kind in ("ReLU", "Tanh", "Flatten"):
        return getattr(nn, kind)()
    if kind == "LeakyReLU":
        return nn.LeakyReLU(float(spec["negative_slope"]))
    args = {k: v for k, v in spec.items() if k not in ("name", "type")}
    for key in ("kernel_size", "stride", "padding", "dilation"):
        if key in args:
            args[key] = tuple(args[key])
    return getattr(nn, kind)(**args)
