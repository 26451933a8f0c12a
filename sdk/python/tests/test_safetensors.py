"""The numpy-only safetensors reader and writer."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import fx
from fx.safetensors import SafetensorsError, dump_safetensors, read_safetensors


def raw(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


@pytest.mark.parametrize(
    "dtype",
    [np.float32, np.float64, np.float16, np.int32, np.int64, np.uint8, np.int8, np.int16, np.uint16, np.uint32, np.uint64, np.bool_],
)
def test_round_trip(dtype):
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((3, 4, 2)) * 10).astype(dtype)
    s = np.asarray(7, dtype=dtype)  # a scalar
    e = np.zeros((0, 5), dtype=dtype)  # an empty tensor
    data = dump_safetensors({"a": a, "s": s, "e": e}, metadata={"format": "np"})
    for buf in (data, bytearray(data), memoryview(data)):
        got = read_safetensors(buf)
        assert list(got) == ["a", "e", "s"]
        for name, want in (("a", a), ("s", s), ("e", e)):
            assert got[name].dtype == np.dtype(dtype) and got[name].shape == want.shape
            np.testing.assert_array_equal(got[name], want)


def test_known_bytes_f32_and_i64():
    # As fx's Go writer and the reference implementation lay it out.
    header = {
        "__metadata__": {"format": "pt"},
        "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "n": {"dtype": "I64", "shape": [1], "data_offsets": [16, 24]},
    }
    data = struct.pack("<4f", 1.0, -2.0, 0.5, 3.25) + struct.pack("<q", -7)
    got = read_safetensors(raw(header, data))
    np.testing.assert_array_equal(got["w"], np.array([[1.0, -2.0], [0.5, 3.25]], np.float32))
    assert got["n"].tolist() == [-7]


def test_f16_and_bf16():
    f16 = np.array([1.5, -0.25, 65504.0], np.float16)
    # bfloat16 is the top half of a float32: 1.0 = 0x3F80, -2.5 = 0xC020, 3.140625 = 0x4049.
    bf16 = struct.pack("<3H", 0x3F80, 0xC020, 0x4049)
    header = {
        "h": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
        "b": {"dtype": "BF16", "shape": [3, 1], "data_offsets": [6, 12]},
    }
    got = read_safetensors(raw(header, f16.tobytes() + bf16))
    np.testing.assert_array_equal(got["h"], f16)
    assert got["b"].dtype == np.float32 and got["b"].shape == (3, 1)
    assert got["b"].ravel().tolist() == [1.0, -2.5, 3.140625]


def test_bf16_matches_float32_truncation():
    x = np.random.default_rng(2).standard_normal(100).astype(np.float32)
    top = (x.view(np.uint32) >> 16).astype(np.uint16)
    got = read_safetensors(raw({"x": {"dtype": "BF16", "shape": [100], "data_offsets": [0, 200]}}, top.tobytes()))["x"]
    np.testing.assert_array_equal(got, (top.astype(np.uint32) << 16).view(np.float32))
    assert np.max(np.abs(got - x)) <= np.max(np.abs(x)) * 2**-7


def test_unaligned_offsets():
    header = {
        "b": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "d": {"dtype": "F64", "shape": [2], "data_offsets": [1, 17]},
    }
    got = read_safetensors(raw(header, b"\x09" + struct.pack("<2d", 1.25, -3.0)))
    assert got["d"].tolist() == [1.25, -3.0] and got["b"].tolist() == [9]


def test_writable_buffer_shares_memory_bytes_copy():
    data = dump_safetensors({"w": np.arange(4, dtype=np.float32)})
    a = read_safetensors(bytearray(data))["w"]
    a[0] = 5  # writable
    b = read_safetensors(bytes(data))["w"]
    b[0] = 5  # a copy, also writable


@pytest.mark.parametrize(
    "data,message",
    [
        (b"\x01\x02", "too short"),
        (struct.pack("<Q", 1 << 40), "header length"),
        (struct.pack("<Q", 100) + b"{}", "past the end"),
        (struct.pack("<Q", 3) + b"abc", "not JSON"),
        (raw([1, 2]), "not a JSON object"),
        (raw({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4), "outside"),
        (raw({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8), "12 expected"),
        (raw({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8), "unsupported dtype"),
        (raw({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}), "bad shape"),
        (raw({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4), "outside"),
        (raw({"w": 3}), "not an object"),
        (raw({"__metadata__": 3}), "__metadata__"),
    ],
)
def test_malformed(data, message):
    with pytest.raises(SafetensorsError, match=message):
        read_safetensors(data)


def test_file_round_trip(tmp_path):
    m = {"layer.weight": np.ones((2, 3), np.float32), "layer.bias": np.zeros(3, np.float64)}
    fx.save_safetensors(m, tmp_path / "m.safetensors")
    got = fx.load_safetensors(tmp_path / "m.safetensors")
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in m.items()}
    # The data section starts 8-byte aligned, as the format recommends.
    (n,) = struct.unpack("<Q", (tmp_path / "m.safetensors").read_bytes()[:8])
    assert n % 8 == 0


def test_dump_refuses():
    with pytest.raises(ValueError):
        dump_safetensors({"__metadata__": np.zeros(1, np.float32)})
    with pytest.raises(ValueError):
        dump_safetensors({"c": np.zeros(1, np.complex64)})
