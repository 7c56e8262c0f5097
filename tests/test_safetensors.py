"""Our safetensors reader: round trips with the `safetensors` package, and
hostile files, each refused with a ModelFileError that names the file and the
field at fault."""
import json
import struct

import numpy as np
import pytest

from fastattn.errors import ModelFileError
from fastattn.loaders.safetensors import (MAX_HEADER_BYTES, SafetensorsFile, load_file,
                                          save_file)

DTYPES = [np.float32, np.float16, np.float64, np.int8, np.uint8, np.int16, np.int32,
          np.int64, np.uint16, np.uint32, np.uint64, np.bool_]


def sample_tensors():
    rng = np.random.default_rng(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        shape = [(3, 5), (7,), (2, 3, 4), ()][i % 4]
        out[f"t{i}.{np.dtype(dtype).name}"] = np.asarray(rng.standard_normal(shape) * 50).astype(dtype)
    out["empty"] = np.zeros((0, 4), np.float32)
    return out


def test_reads_what_the_package_writes(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    tensors = sample_tensors()
    path = tmp_path / "a.safetensors"
    st.save_file(tensors, str(path), metadata={"format": "np", "note": "x"})
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "np", "note": "x"}
        assert sorted(f.names()) == sorted(tensors)
        for name, want in tensors.items():
            got = f.array(name)
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
            assert not got.flags.writeable


def test_package_reads_what_we_write(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    tensors = sample_tensors()
    path = tmp_path / "b.safetensors"
    save_file(tensors, path, metadata={"k": "v"})
    back = st.load_file(str(path))
    assert sorted(back) == sorted(tensors)
    for name, want in tensors.items():
        np.testing.assert_array_equal(back[name], want)
        assert back[name].dtype == want.dtype
    # and ours reads it back too
    for name, got in load_file(path).items():
        np.testing.assert_array_equal(got, tensors[name])


def test_bf16_from_torch(tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    t = torch.randn(4, 6).to(torch.bfloat16)
    path = tmp_path / "c.safetensors"
    st.save_file({"w": t}, str(path))
    with SafetensorsFile(path) as f:
        assert f.info("w").dtype == "BF16" and f.info("w").shape == (4, 6)
        raw = f.array("w")                                  # uint16 bit patterns
        floats = (raw.astype(np.uint32) << 16).view(np.float32)
        np.testing.assert_array_equal(floats, t.float().numpy())


# ------------------------------------------------------------ hostile files


def raw_file(path, header, data=b"", length=None):
    """A file with the given header (dict -> JSON, or raw bytes) and data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(text) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + text + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HOSTILE = {
    "too-short": (lambda p: p.write_bytes(b"\x05\x00\x00"), r"3 bytes, too short"),
    "empty": (lambda p: p.write_bytes(b""), r"0 bytes, too short"),
    "header-past-end": (lambda p: raw_file(p, {"a": entry()}, b"\0" * 8, length=1000),
                        r"header length 1000 runs past the end"),
    "header-over-cap": (lambda p: raw_file(p, b"{}", length=2**63),
                        rf"header length {2**63} exceeds the cap of {MAX_HEADER_BYTES}"),
    "not-utf8": (lambda p: raw_file(p, b'{"\xff": 1}'), r"header: not valid UTF-8"),
    "bad-json": (lambda p: raw_file(p, b'{"a": {"dtype": "F32",'), r"header: invalid JSON"),
    "not-object": (lambda p: raw_file(p, b"[1, 2]"), r"expected a JSON object"),
    "duplicate-key": (lambda p: raw_file(p, b'{"a": {}, "a": {}}'), r"key 'a' appears twice"),
    "nan": (lambda p: raw_file(p, b'{"a": NaN}'), r"NaN is not valid JSON"),
    "deep-json": (lambda p: raw_file(p, b'{"a": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
                  r"nested too deeply"),
    "entry-not-object": (lambda p: raw_file(p, {"a": [1, 2]}), r"tensor 'a'.*expected an object"),
    "missing-field": (lambda p: raw_file(p, {"a": {"dtype": "F32", "shape": [2]}}),
                      r"tensor 'a': field 'data_offsets' is missing"),
    "extra-field": (lambda p: raw_file(p, {"a": {**entry(), "offset": 3}}, b"\0" * 8),
                    r"tensor 'a': field 'offset' is not a safetensors field"),
    "unknown-dtype": (lambda p: raw_file(p, {"a": entry(dtype="F33")}, b"\0" * 8),
                      r"tensor 'a': field 'dtype' has unknown value 'F33'"),
    "negative-dim": (lambda p: raw_file(p, {"a": entry(shape=(-2,))}, b"\0" * 8),
                     r"tensor 'a': field 'shape' has value \[-2\]"),
    "float-dim": (lambda p: raw_file(p, {"a": entry(shape=(2.0,))}, b"\0" * 8),
                  r"tensor 'a': field 'shape' has value \[2.0\]"),
    "bool-dim": (lambda p: raw_file(p, {"a": entry(shape=(True,))}, b"\0" * 8),
                 r"tensor 'a': field 'shape' has value \[True\]"),
    "shape-overflow": (lambda p: raw_file(p, {"a": entry(shape=(2**40, 2**40))}, b"\0" * 8),
                       r"tensor 'a': field 'shape' .* overflows"),
    "offsets-past-data": (lambda p: raw_file(p, {"a": entry(offsets=(8, 16))}, b"\0" * 8),
                          r"tensor 'a': field 'data_offsets' has value \[8, 16\], past"),
    "begin-after-end": (lambda p: raw_file(p, {"a": entry(offsets=(8, 0))}, b"\0" * 8),
                        r"tensor 'a': field 'data_offsets' has value \[8, 0\]: begin"),
    "wrong-length": (lambda p: raw_file(p, {"a": entry(shape=(3,))}, b"\0" * 8),
                     r"tensor 'a': field 'data_offsets'.*8 bytes, but shape \[3\]"),
    "offsets-not-pair": (lambda p: raw_file(p, {"a": entry(offsets=(0, 4, 8))}, b"\0" * 8),
                         r"tensor 'a': field 'data_offsets' has value \[0, 4, 8\]"),
    "overlap": (lambda p: raw_file(p, {"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))},
                                   b"\0" * 12), r"tensor 'b'.*overlapping"),
    "gap": (lambda p: raw_file(p, {"a": entry(offsets=(0, 8)), "b": entry(offsets=(12, 20))},
                               b"\0" * 20), r"tensor 'b'.*leaving bytes 8..12"),
    "tail": (lambda p: raw_file(p, {"a": entry()}, b"\0" * 12), r"12 bytes but the tensors "
             r"cover only 8"),
    "bad-metadata": (lambda p: raw_file(p, {"__metadata__": {"k": 1}}), r"__metadata__"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_file_is_refused(tmp_path, name):
    make, match = HOSTILE[name]
    path = tmp_path / f"{name}.safetensors"
    make(path)
    with pytest.raises(ModelFileError, match=match) as info:
        SafetensorsFile(path)
    assert str(path) in str(info.value)


def test_missing_file_and_unknown_tensor(tmp_path):
    with pytest.raises(ModelFileError, match="cannot read"):
        SafetensorsFile(tmp_path / "nope.safetensors")
    path = tmp_path / "ok.safetensors"
    save_file({"a": np.zeros(3, np.float32)}, path)
    with pytest.raises(ModelFileError, match="no tensor named 'b'"):
        SafetensorsFile(path).array("b")


def test_views_outlive_the_file_object(tmp_path):
    path = tmp_path / "v.safetensors"
    save_file({"a": np.arange(6, dtype=np.float32)}, path)
    f = SafetensorsFile(path)
    a = f.array("a")
    f.close()
    del f
    np.testing.assert_array_equal(a, np.arange(6, dtype=np.float32))
