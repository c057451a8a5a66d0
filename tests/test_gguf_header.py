"""The runtime's GGUF header reader against the reference, gguf-py's GGUFReader."""

import gguf
import numpy as np
import pytest

from llavao1_edge.api import shipped_model
from llavao1_edge.gguf_header import HeaderError, read_header


def _same(path):
    ref, got = gguf.GGUFReader(str(path)), read_header(path)
    assert list(got.fields) == [k for k in ref.fields if not k.startswith("GGUF.")]
    for key, field in got.fields.items():
        expected = ref.fields[key]
        assert field.types == expected.types, key
        value, want = field.contents(), expected.contents()
        if isinstance(want, float) or (isinstance(want, list) and want and isinstance(want[0], float)):
            assert np.allclose(value, want, rtol=0, atol=0), key
        else:
            assert value == want, key
    assert [(t.name, t.shape, t.tensor_type, t.data_offset, t.n_bytes, t.n_elements) for t in got.tensors] == \
        [(t.name, tuple(int(d) for d in t.shape), t.tensor_type, int(t.data_offset), int(t.n_bytes), int(t.n_elements))
         for t in ref.tensors]
    return got


@pytest.mark.parametrize("role", ["text", "mmproj", "unquantized"])
def test_header_equals_gguf_reader_on_the_shipped_files(role):
    header = _same(shipped_model()[role])
    assert header.size == shipped_model()[role].stat().st_size


def test_header_reads_every_value_type(tmp_path):
    path = tmp_path / "all.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    for i, vtype in enumerate(gguf.GGUFValueType):
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value("k.array_f32", [0.5, -1.25], vtype, sub_type=gguf.GGUFValueType.FLOAT32)
            w.add_key_value("k.array_str", ["a", "bé", ""], vtype, sub_type=gguf.GGUFValueType.STRING)
            w.add_key_value("k.array_i64", [-(2 ** 40), 7], vtype, sub_type=gguf.GGUFValueType.INT64)
        elif vtype == gguf.GGUFValueType.STRING:
            w.add_key_value("k.string", "ünïcode", vtype)
        elif vtype == gguf.GGUFValueType.BOOL:
            w.add_key_value("k.bool", True, vtype)
        else:
            w.add_key_value(f"k.{vtype.name.lower()}", 1.5 if "FLOAT" in vtype.name else i + 1, vtype)
    w.add_tensor("t.f16", np.ones((3, 64), np.float16))
    w.add_tensor("t.q8", gguf.quants.quantize(np.ones((2, 64), np.float32), gguf.GGMLQuantizationType.Q8_0),
                 raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    _same(path)


def test_bad_headers_raise_instead_of_crashing(tmp_path):
    text = shipped_model()["text"].read_bytes()
    for name, data, problem in (("short", b"GGUF\x03\x00", "truncated"), ("magic", b"GGML" + text[4:], "not a GGUF"),
                                ("cut", text[:2000], "truncated")):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(HeaderError, match=problem):
            read_header(tmp_path / name)
