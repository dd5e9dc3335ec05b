"""The container of a ``.bc`` file: length, JSON header, checksum and the tensor table.

A file is a safetensors container (``safetensors.numpy.load_file`` reads it), written and read by
this module's own strict code:

- 8 bytes: the header's length ``N``, little-endian;
- ``N`` bytes: a JSON header, padded with spaces to a multiple of 8. ``"__metadata__"`` holds
  ``format`` (``"pyro_bc.compressed"``), ``version`` (``"1"``), ``network`` (a JSON string: the
  input shape and the modules in order) and ``sha256`` (of the network string followed by the
  data section); every other entry describes one tensor (``dtype``, ``shape``,
  ``data_offsets``), as in safetensors;
- the data section: the tensors' bytes back to back, float32 tensors first (so that they stay
  4-byte aligned, as safetensors readers expect).

Every size is checked against the file's length before anything is allocated; any failure raises
:class:`CompressedFileError` naming the file and the problem.
"""

from __future__ import annotations

import hashlib
import json
import math

FORMAT = "pyro_bc.compressed"
VERSION = "1"
MAX_HEADER_BYTES = 16 * 2**20
MAX_SIZE = 2**31 - 1  # any one count (features, channels, kernel size, ...)
ITEMSIZE = {"U8": 1, "F32": 4}


class CompressedFileError(ValueError):
    """A file that is not a valid pyro_bc compressed network (truncated, corrupted, hostile).

    Example::

        try:
            network = pyro_bc.load("download.bc")
        except CompressedFileError as e:  # also a ValueError
            print(e)  # "download.bc: the checksum does not match ..."
    """


def write_container(description: str, tensors: list) -> bytes:
    """The file's bytes for a network ``description`` (JSON text) and its tensors.

    ``tensors`` is a list of ``(key, dtype, shape, raw bytes)``; float32 ones are placed first.

    Example::

        data = write_container('{"input_shape":[4],"modules":[]}', [])
    """
    tensors = sorted(tensors, key=lambda t: t[1] != "F32")
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
    return len(text).to_bytes(8, "little") + text + data


class Container:
    """A parsed, checksummed container: its network description, tensor table and data section.

    Example::

        container = Container(path.read_bytes(), source=str(path))
        description = container.json(container.network, "network")
    """

    def __init__(self, data: bytes, source: str):
        self.source = source
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
        self.header_bytes = 8 + size
        header = self.json(data[8 : 8 + size], "header")
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
        self.buffer = data[8 + size :]
        self.network = metadata["network"].encode("utf-8", "surrogatepass")
        if hashlib.sha256(self.network + self.buffer).hexdigest() != metadata["sha256"]:
            raise self.error(
                "the checksum does not match the network and data: the file is corrupted "
                "or truncated"
            )
        self.table = self._table(header)

    def error(self, message: str) -> CompressedFileError:
        """A :class:`CompressedFileError` that names the file."""
        return CompressedFileError(f"{self.source}: {message}")

    def json(self, raw: bytes, what: str):
        """Strict JSON: no duplicate keys, no NaN or infinity."""
        try:
            return json.loads(
                raw.decode("utf-8"),
                object_pairs_hook=_unique_keys,
                parse_constant=_reject_constant,
            )
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self.error(f"the {what} is not valid JSON ({e})") from None

    def raw(self, key: str) -> bytes:
        """The bytes of tensor ``key``."""
        begin, end = self.table[key][2]
        return self.buffer[begin:end]

    def _table(self, header):
        data_size = len(self.buffer)
        table = {}
        for key, entry in header.items():
            if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
                raise self.error(f"tensor {key!r} needs exactly dtype, shape and data_offsets")
            dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not isinstance(dtype, str) or dtype not in ITEMSIZE:
                raise self.error(
                    f"tensor {key!r} has dtype {dtype!r}; a pyro_bc file holds only U8 and F32"
                )
            if not isinstance(shape, list) or not all(is_int(s, 0, MAX_SIZE) for s in shape):
                raise self.error(f"tensor {key!r} has an invalid shape {shape!r}")
            if (
                not isinstance(offsets, list)
                or len(offsets) != 2
                or not all(is_int(o, 0, data_size) for o in offsets)
                or offsets[0] > offsets[1]
            ):
                raise self.error(
                    f"tensor {key!r} has data_offsets {offsets!r} outside the data section of "
                    f"{data_size:,} bytes: the file is truncated or corrupted"
                )
            if math.prod(shape) * ITEMSIZE[dtype] != offsets[1] - offsets[0]:
                raise self.error(
                    f"tensor {key!r}: shape {shape} of {dtype} does not fill data_offsets {offsets}"
                )
            table[key] = (dtype, shape, offsets)
        return table

    def check_tensors(self, expected: list) -> None:
        """The tensors must be exactly ``expected`` (``(key, dtype, shape)``), where the writer
        puts them: float32 first, then in module order, with no unused bytes."""
        table = self.table
        names = [key for key, _, _ in expected]
        if set(table) != set(names):
            missing, extra = set(names) - set(table), set(table) - set(names)
            raise self.error(
                f"the tensors do not match the modules (missing {sorted(missing)}, unexpected "
                f"{sorted(extra)})"
            )
        offset = 0
        for key, dtype, shape in sorted(expected, key=lambda item: item[1] != "F32"):
            have = table[key]
            if have[0] != dtype or have[1] != shape:
                raise self.error(
                    f"tensor {key!r} is {have[0]} {have[1]}, but its module needs {dtype} {shape}"
                )
            if have[2] != [offset, offset + math.prod(shape) * ITEMSIZE[dtype]]:
                raise self.error(f"tensor {key!r} is not where a pyro_bc file puts it")
            offset = have[2][1]
        if offset != len(self.buffer):
            raise self.error(f"the data section has {len(self.buffer) - offset:,} unused bytes")


def is_int(value, low, high) -> bool:
    """A JSON integer (not a bool or float) in ``low..high``."""
    return type(value) is int and low <= value <= high


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise ValueError(f"duplicate keys {sorted({k for k in keys if keys.count(k) > 1})}")
    return dict(pairs)


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed")
