import json
import struct
from pathlib import Path

import pytest

from lowbit.eval.size import size_from_model, size_from_params
from lowbit.io.header import model_tensor_infos, read_safetensors_header

SHARED = Path(__file__).resolve().parents[3] / "shared"
MODEL_19M = SHARED / "models" / "llama-19m-shakespeare-mix"


def test_7b_params_fp32_is_28_gb_and_int4_g128_adds_a_quarter_bit():
    rows = {r.name: r for r in size_from_params(7e9)}
    assert rows["fp32"].nbytes == 28_000_000_000
    assert rows["fp16"].nbytes == 14_000_000_000
    assert rows["w4g128"].bits_per_weight == pytest.approx(4 + 32 / 128)
    assert rows["w4g64"].bits_per_weight == pytest.approx(4 + 32 / 64)
    assert rows["w4g128-sym"].bits_per_weight == pytest.approx(4 + 16 / 128)
    assert rows["w3g128"].nbytes == pytest.approx(7e9 * 3.25 / 8, rel=1e-9)


@pytest.mark.parametrize("bad", [0, -1, float("nan")])
def test_params_must_be_positive(bad):
    with pytest.raises(ValueError, match="--params"):
        size_from_params(bad)


def _write_safetensors(path: Path, tensors: dict, truncate: int = 0) -> None:
    header, offset = {}, 0
    for name, (dtype, shape, nbytes) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * (offset - truncate))


def test_model_folder_sizes_from_headers(tmp_path):
    _write_safetensors(tmp_path / "model.safetensors", {
        "layer.weight": ("F16", [256, 512], 256 * 512 * 2),
        "odd.weight": ("F16", [8, 100], 8 * 100 * 2),
        "norm.weight": ("F16", [512], 512 * 2),
    })
    rows, summary = size_from_model(tmp_path)
    assert summary["params"] == 256 * 512 + 800 + 512
    by = {r.name: r for r in rows}
    expected = 256 * 512 // 2 + 256 * 4 * 4 + 800 * 2 + 512 * 2  # odd.weight can't tile g128
    assert by["w4g128"].nbytes == expected
    assert "1 matrices kept" in by["w4g128"].description


def test_truncated_and_missing_files(tmp_path):
    _write_safetensors(tmp_path / "model.safetensors", {"w.weight": ("F32", [4, 4], 64)},
                       truncate=10)
    with pytest.raises(ValueError, match="truncated"):
        read_safetensors_header(tmp_path / "model.safetensors")
    (tmp_path / "x.safetensors").write_bytes(b"abc")
    with pytest.raises(ValueError, match="not a safetensors file"):
        read_safetensors_header(tmp_path / "x.safetensors")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        model_tensor_infos(empty)
    with pytest.raises(ValueError, match="is not a folder"):
        model_tensor_infos(tmp_path / "nope")


@pytest.mark.skipif(not MODEL_19M.exists(), reason="fixture model ../shared/models absent")
def test_real_sharded_model():
    rows, summary = size_from_model(MODEL_19M)
    assert summary["params"] == 18_880_896  # the README's 19M, from the three shards' headers
    by = {r.name: r for r in rows}
    assert by["fp16"].nbytes == summary["stored_bytes"]
    assert 4.25 < by["w4g128"].bits_per_weight < 4.26


@pytest.mark.parametrize(("header", "message"), [
    ([1, 2], "not a JSON object"),
    ({"w": {"dtype": "F32", "shape": [2]}}, "needs dtype, shape and data_offsets"),
    ({"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, "dtype 'Q9'"),
    ({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 8]}}, "not a list of sizes"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": ["0", "8"]}}, "data_offsets"),
    ({"w": {"dtype": "F32", "shape": [2 ** 40], "data_offsets": [0, 8]}}, "need"),
])
def test_malformed_headers_are_refused_naming_the_tensor(tmp_path, header, message):
    blob = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * 8)
    with pytest.raises(ValueError, match=message):
        read_safetensors_header(path)
