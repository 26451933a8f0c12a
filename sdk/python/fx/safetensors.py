"""A small safetensors reader and writer on numpy alone.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
naming every tensor's dtype, shape and [begin, end) byte offsets into the data
that follows, then the data (row-major, little-endian).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Dict, Mapping, Optional, Union

import numpy as np

# safetensors dtype → numpy dtype (little-endian). BF16 is handled apart.
_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {v.newbyteorder("<") if v.itemsize > 1 else v: k for k, v in _DTYPES.items()}

# Headers beyond this are refused (the format's own readers use 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024


class SafetensorsError(ValueError):
    """The bytes are not a valid safetensors file; the message says why."""


Buffer = Union[bytes, bytearray, memoryview]


def parse_header(data: Buffer) -> tuple:
    """Returns (header dict without __metadata__, metadata or None, data start)."""
    mv = memoryview(data)
    if len(mv) < 8:
        raise SafetensorsError(f"{len(mv)} bytes: too short for a safetensors file (it starts with an 8-byte header length)")
    (n,) = struct.unpack("<Q", mv[:8])
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(f"header length {n} is over {MAX_HEADER_BYTES} bytes: not a safetensors file?")
    if 8 + n > len(mv):
        raise SafetensorsError(f"header length {n} runs past the end of the {len(mv)}-byte file")
    try:
        header = json.loads(bytes(mv[8 : 8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise SafetensorsError(f"the header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError("the header is not a JSON object")
    meta = header.pop("__metadata__", None)
    if meta is not None and not isinstance(meta, dict):
        raise SafetensorsError("__metadata__ is not an object")
    return header, meta, 8 + n


def read_safetensors(data: Buffer) -> Dict[str, np.ndarray]:
    """Parses safetensors bytes into {name: numpy array}, in file order.

    Arrays share memory with ``data`` when it is writable (a bytearray) and are
    copies otherwise. BF16 tensors are widened to float32 exactly.
    """
    header, _, start = parse_header(data)
    mv = memoryview(data)
    body = len(mv) - start
    writable = not mv.readonly
    out: Dict[str, np.ndarray] = {}
    for name, info in header.items():
        if not isinstance(info, dict):
            raise SafetensorsError(f"tensor {name!r}: its entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise SafetensorsError(f"tensor {name!r}: bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= body
        ):
            raise SafetensorsError(f"tensor {name!r}: data_offsets {offsets!r} outside the {body}-byte data section")
        count = 1
        for d in shape:
            count *= d
        if dtype == "BF16":
            npdt = np.dtype("<u2")
        elif dtype in _DTYPES:
            npdt = _DTYPES[dtype]
        else:
            raise SafetensorsError(f"tensor {name!r}: unsupported dtype {dtype!r} (want one of {', '.join(sorted(list(_DTYPES) + ['BF16']))})")
        begin, end = offsets
        if end - begin != count * npdt.itemsize:
            raise SafetensorsError(
                f"tensor {name!r}: {end - begin} bytes of data for shape {shape} of {dtype} ({count * npdt.itemsize} expected)"
            )
        arr = np.frombuffer(mv, dtype=npdt, count=count, offset=start + begin).reshape(shape)
        if dtype == "BF16":
            # bfloat16 is the top half of a float32.
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        elif not writable:
            arr = arr.copy()
        out[name] = arr
    return out


def load_safetensors(path: Union[str, os.PathLike]) -> Dict[str, np.ndarray]:
    """Reads a safetensors file into {name: numpy array}."""
    with open(path, "rb") as f:
        return read_safetensors(bytearray(f.read()))


def dump_safetensors(tensors: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]] = None) -> bytes:
    """Serialises {name: array} as safetensors bytes (tensors in name order).

    Supported dtypes: float64/32/16, int64/32/16/8, uint64/32/16/8, bool.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blobs = []
    offset = 0
    for name in sorted(tensors):
        if name == "__metadata__":
            raise ValueError("a tensor cannot be named __metadata__")
        arr = np.asarray(tensors[name])
        dt = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
        if dt not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {arr.dtype} has no safetensors name")
        raw = np.ascontiguousarray(arr, dtype=dt).tobytes()
        header[name] = {"dtype": _NAMES[dt], "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * (-len(hj) % 8)  # align the data section to 8 bytes
    return struct.pack("<Q", len(hj)) + hj + b"".join(blobs)


def save_safetensors(tensors: Mapping[str, np.ndarray], path: Union[str, os.PathLike], metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes {name: array} to path as a safetensors file."""
    data = dump_safetensors(tensors, metadata)
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
