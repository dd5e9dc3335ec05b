"""One entry per module type a ``.bc`` file may hold: its fields, tensors and how to rebuild it.

A new module type is one :class:`ModuleCodec` subclass added to :data:`REGISTRY`: how to describe
a module as JSON fields and tensors (writing), which fields are valid, which tensors a description
needs, how many values it allocates, and how to build the module back (reading). Reading trusts
nothing: fields are validated before any tensor is allocated.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..fixed_point import MAX_FRACTION_BITS, MAX_WIDTH, dequantize, fixed_point_width, on_grid
from ..gather import Gather
from .bits import pack_bits, packed_size, unpack_chunks
from .container import MAX_SIZE, is_int

#: the largest |negative_slope| of a LeakyReLU a file may hold
MAX_SLOPE = 1e3


def _size(value):
    return is_int(value, 1, MAX_SIZE)


def _pair_of(low):
    return lambda v: (
        isinstance(v, list) and len(v) == 2 and all(is_int(x, low, MAX_SIZE) for x in v)
    )


def _flag(value):
    return type(value) is bool


def _pair(value):
    return [int(v) for v in value] if isinstance(value, (tuple, list)) else [int(value)] * 2


def _f32_bytes(tensor):
    return tensor.detach().cpu().float().contiguous().numpy().astype("<f4").tobytes()


class ModuleCodec:
    """How one module type is written and read. Subclasses set the class attributes and
    override what their type needs.

    Example::

        codec = REGISTRY["ReLU"]
        codec.build({"name": "relu1", "type": "ReLU"}, container=None)  # ReLU()
    """

    #: the type name written in the file
    type_name: str
    #: the torch module class it stands for
    module_type: type
    #: field name -> validator of the field's JSON value
    fields: dict = {}

    def accepts(self, module) -> bool:
        """Whether this entry writes ``module``."""
        return type(module) is self.module_type

    def describe(self, name, module, formats) -> tuple[dict, list]:
        """The module's JSON fields and its tensors ``(key, dtype, shape, bytes)``."""
        return {}, []

    def tensors(self, spec) -> list:
        """The tensors ``(key, dtype, shape)`` a valid description needs."""
        return []

    def parameters(self, spec) -> int:
        """How many values building the module allocates."""
        return 0

    def build(self, spec, container) -> nn.Module:
        """The module, from a validated description and the file's container."""
        return self.module_type(**self._arguments(spec))

    def meta_forward(self, spec, x):
        """The module's output for a ``meta`` input (checks shapes, allocates nothing)."""
        return self.build(spec, None)(x)

    def _arguments(self, spec):
        args = {k: v for k, v in spec.items() if k not in ("name", "type")}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}


class _Stateless(ModuleCodec):
    def __init__(self, module_type):
        self.module_type = module_type
        self.type_name = module_type.__name__


class _FlattenCodec(ModuleCodec):
    type_name, module_type = "Flatten", nn.Flatten

    def accepts(self, module):
        return type(module) is nn.Flatten and (module.start_dim, module.end_dim) == (1, -1)


class _LeakyReLUCodec(ModuleCodec):
    type_name, module_type = "LeakyReLU", nn.LeakyReLU
    fields = {
        "negative_slope": lambda v: (
            type(v) in (int, float) and math.isfinite(v) and abs(v) <= MAX_SLOPE
        )
    }

    def describe(self, name, module, formats):
        return {"negative_slope": float(module.negative_slope)}, []


class _PoolCodec(ModuleCodec):
    """A 2-d pooling module: its fields are its arguments, sizes as pairs."""

    def describe(self, name, module, formats):
        fields = {}
        for key, check in self.fields.items():
            value = getattr(module, key)
            if key in ("kernel_size", "stride", "padding", "dilation"):
                value = _pair(value)
            elif check is _flag:
                value = bool(value)
            fields[key] = value
        return fields, []

    def meta_forward(self, spec, x):
        if x.dim() != 4:
            raise ValueError(f"{self.type_name} needs (channels, height, width)")
        return super().meta_forward(spec, x)


class _MaxPoolCodec(_PoolCodec):
    type_name, module_type = "MaxPool2d", nn.MaxPool2d
    fields = {
        "kernel_size": _pair_of(1),
        "stride": _pair_of(1),
        "padding": _pair_of(0),
        "dilation": _pair_of(1),
        "ceil_mode": _flag,
    }

    def accepts(self, module):
        return type(module) is nn.MaxPool2d and not module.return_indices


class _AvgPoolCodec(_PoolCodec):
    type_name, module_type = "AvgPool2d", nn.AvgPool2d
    fields = {
        "kernel_size": _pair_of(1),
        "stride": _pair_of(1),
        "padding": _pair_of(0),
        "ceil_mode": _flag,
        "count_include_pad": _flag,
        "divisor_override": lambda v: v is None or _size(v),
    }


class _GatherCodec(ModuleCodec):
    """A packed bit mask over the inputs: one bit per input, set where the input is kept."""

    type_name, module_type = "Gather", Gather
    fields = {"in_features": _size, "out_features": _size}

    def describe(self, name, module, formats):
        index = module.index.cpu()
        if index.numel() > 1 and not (index[1:] > index[:-1]).all():
            raise ValueError(f"save: Gather {name!r} must select distinct, increasing inputs")
        mask = np.zeros(module.in_features, dtype=np.uint8)
        mask[index.numpy()] = 1
        packed = np.packbits(mask).tobytes()
        fields = {"in_features": module.in_features, "out_features": module.out_features}
        return fields, [(f"{name}.mask", "U8", [len(packed)], packed)]

    def tensors(self, spec):
        if spec["out_features"] > spec["in_features"]:
            raise ValueError("it selects more inputs than it has")
        return [(f"{spec['name']}.mask", "U8", [packed_size(spec["in_features"], 1)])]

    def parameters(self, spec):
        return spec["out_features"]

    def build(self, spec, container):
        name = spec["name"]
        mask = np.unpackbits(np.frombuffer(container.raw(f"{name}.mask"), np.uint8))
        index = np.flatnonzero(mask[: spec["in_features"]])
        if len(index) != spec["out_features"] or mask[spec["in_features"] :].any():
            raise container.error(f"Gather {name!r}: its mask does not select out_features inputs")
        return Gather(torch.from_numpy(index), spec["in_features"])

    def meta_forward(self, spec, x):
        if x.dim() != 2 or x.shape[1] != spec["in_features"]:
            raise ValueError(f"Gather needs ({spec['in_features']},) features")
        return x[:, : spec["out_features"]]


class _WeightedCodec(ModuleCodec):
    """A layer whose weights are fixed-point integers packed at the layer's width (``"U8"``), or
    float32 (``"F32"``) when it has no format; its bias is float32."""

    common = {
        "bias": _flag,
        "frac_bits": lambda v: v is None or is_int(v, 0, MAX_FRACTION_BITS),
        "width": lambda v: v is None or is_int(v, 1, MAX_WIDTH),
    }

    def weight_shape(self, spec) -> list:
        raise NotImplementedError

    def layer_fields(self, module) -> dict:
        raise NotImplementedError

    def describe(self, name, module, formats):
        if name not in formats:
            raise ValueError(f"save: layer {name!r} has no number format in network.formats")
        t = formats[name]
        fields = {**self.layer_fields(module), "bias": module.bias is not None, "frac_bits": t}
        weight = module.weight.detach().cpu().float()
        if t is None:
            fields["width"] = None
            tensors = [(f"{name}.weight", "F32", list(weight.shape), _f32_bytes(weight))]
        else:
            q = on_grid(weight, t)
            if q is None:
                raise ValueError(
                    f"save: the weights of layer {name!r} are not on its grid 2^-{t}; they "
                    "changed after compress. Compress again (or set network.formats[name] = None "
                    "to store float32)."
                )
            width = fixed_point_width(q)
            if width > MAX_WIDTH:
                raise ValueError(f"save: layer {name!r} needs {width} > {MAX_WIDTH} bits a weight")
            fields["width"] = width
            packed = pack_bits(q.numpy(), width)
            tensors = [(f"{name}.weight", "U8", [len(packed)], packed)]
        if module.bias is not None:
            bias = module.bias
            tensors.append((f"{name}.bias", "F32", [bias.numel()], _f32_bytes(bias)))
        return fields, tensors

    def tensors(self, spec):
        name, shape = spec["name"], self.weight_shape(spec)
        t, width = spec["frac_bits"], spec["width"]
        if (t is None) != (width is None):
            raise ValueError("frac_bits and width must both be set or null")
        if t is None:
            tensors = [(f"{name}.weight", "F32", shape)]
        else:
            tensors = [(f"{name}.weight", "U8", [packed_size(math.prod(shape), width)])]
        if spec["bias"]:
            tensors.append((f"{name}.bias", "F32", [shape[0]]))
        return tensors

    def parameters(self, spec):
        shape = self.weight_shape(spec)
        return math.prod(shape) + (shape[0] if spec["bias"] else 0)

    def build(self, spec, container):
        name, shape = spec["name"], self.weight_shape(spec)
        raw = container.raw(f"{name}.weight")
        layer = self.empty_layer(spec, shape)
        # Straight into the layer's weights, a chunk at a time: the file's 1-bit integers would
        # otherwise pass through int64 and float64 copies, 6x the network itself.
        weight = layer.weight.detach().view(-1).numpy()
        if spec["frac_bits"] is None:
            weight[:] = np.frombuffer(raw, "<f4")
        else:
            for start, q in unpack_chunks(raw, len(weight), spec["width"]):
                weight[start : start + len(q)] = dequantize(torch.from_numpy(q), spec["frac_bits"])
        with torch.no_grad():
            if spec["bias"]:
                bias = np.frombuffer(container.raw(f"{name}.bias"), "<f4").copy()
                layer.bias.copy_(torch.from_numpy(bias))
        return layer

    def empty_layer(self, spec, shape) -> nn.Module:
        raise NotImplementedError


class _LinearCodec(_WeightedCodec):
    type_name, module_type = "Linear", nn.Linear
    fields = {"in_features": _size, "out_features": _size, **_WeightedCodec.common}

    def weight_shape(self, spec):
        return [spec["out_features"], spec["in_features"]]

    def layer_fields(self, module):
        return {"in_features": module.in_features, "out_features": module.out_features}

    def empty_layer(self, spec, shape):
        return nn.utils.skip_init(nn.Linear, shape[1], shape[0], bias=spec["bias"])

    def meta_forward(self, spec, x):
        if x.dim() != 2 or x.shape[1] != spec["in_features"]:
            raise ValueError(f"Linear needs ({spec['in_features']},) features")
        return F.linear(x, torch.empty(self.weight_shape(spec), device="meta"))


class _Conv2dCodec(_WeightedCodec):
    type_name, module_type = "Conv2d", nn.Conv2d
    fields = {
        "in_channels": _size,
        "out_channels": _size,
        "kernel_size": _pair_of(1),
        "stride": _pair_of(1),
        "padding": lambda v: v in ("same", "valid") or _pair_of(0)(v),
        "dilation": _pair_of(1),
        **_WeightedCodec.common,
    }

    def accepts(self, module):
        return type(module) is nn.Conv2d

    def layer_fields(self, module):
        if module.groups != 1 or module.padding_mode != "zeros":
            raise ValueError("save: a Conv2d must have groups=1 and zero padding")
        padding = module.padding if isinstance(module.padding, str) else _pair(module.padding)
        return {
            "in_channels": module.in_channels,
            "out_channels": module.out_channels,
            "kernel_size": _pair(module.kernel_size),
            "stride": _pair(module.stride),
            "padding": padding,
            "dilation": _pair(module.dilation),
        }

    def weight_shape(self, spec):
        return [spec["out_channels"], spec["in_channels"], *spec["kernel_size"]]

    def empty_layer(self, spec, shape):
        padding = spec["padding"]
        return nn.utils.skip_init(
            nn.Conv2d,
            shape[1],
            shape[0],
            tuple(spec["kernel_size"]),
            stride=tuple(spec["stride"]),
            padding=padding if isinstance(padding, str) else tuple(padding),
            dilation=tuple(spec["dilation"]),
            bias=spec["bias"],
        )

    def meta_forward(self, spec, x):
        if x.dim() != 4 or x.shape[1] != spec["in_channels"]:
            raise ValueError(f"Conv2d needs ({spec['in_channels']}, height, width)")
        weight = torch.empty(self.weight_shape(spec), device="meta")
        return F.conv2d(x, weight, None, spec["stride"], spec["padding"], spec["dilation"])


#: type name -> entry, for every module type a file may hold (the reader's whitelist)
REGISTRY = {
    codec.type_name: codec
    for codec in (
        _LinearCodec(),
        _Conv2dCodec(),
        _Stateless(nn.ReLU),
        _Stateless(nn.Tanh),
        _LeakyReLUCodec(),
        _MaxPoolCodec(),
        _AvgPoolCodec(),
        _FlattenCodec(),
        _GatherCodec(),
    )
}


def codec_for(name: str, module: nn.Module) -> ModuleCodec:
    """The entry that writes ``module``, or a ``ValueError`` naming it and what a file holds.

    Example::

        codec_for("relu1", nn.ReLU()).type_name  # "ReLU"
    """
    for codec in REGISTRY.values():
        if codec.accepts(module):
            return codec
    raise ValueError(
        f"save: module {name!r} ({type(module).__name__}) cannot be stored; a file holds only "
        f"{', '.join(REGISTRY)} (Flatten(1, -1), MaxPool2d without indices, Conv2d with groups=1)"
    )
