"""jaxlm's torch-free safetensors reader and writer against the `safetensors` package."""

import json

import ml_dtypes
import numpy as np
import pytest

safetensors_numpy = pytest.importorskip("safetensors.numpy")
torch = pytest.importorskip("torch")

from safetensors.torch import load_file as torch_load  # noqa: E402
from safetensors.torch import save_file as torch_save  # noqa: E402

from jaxlm.interop import safetensors_io  # noqa: E402

RNG = np.random.default_rng(0)
ARRAYS = {
    "a.weight": RNG.standard_normal((3, 5)).astype(np.float32),
    "b.half": RNG.standard_normal((7,)).astype(np.float16),
    "c.ids": np.arange(6, dtype=np.int64).reshape(2, 3),
    "d.scalar": np.asarray(2.5, np.float32),
    "e.empty": np.zeros((0, 4), np.float32),
}


def test_reads_what_the_safetensors_package_writes(tmp_path):
    safetensors_numpy.save_file(ARRAYS, tmp_path / "x.safetensors", metadata={"k": "v"})
    f = safetensors_io.SafetensorsFile(tmp_path / "x.safetensors")
    assert sorted(f.names()) == sorted(ARRAYS) and f.metadata == {"k": "v"}
    for name, want in ARRAYS.items():
        assert f.shape(name) == want.shape and f.dtype(name) == want.dtype
        np.testing.assert_array_equal(f.view(name), want)


def test_bfloat16_both_ways_against_torch(tmp_path):
    x = torch.randn(4, 6).to(torch.bfloat16)
    torch_save({"w": x}, tmp_path / "t.safetensors")
    view = safetensors_io.SafetensorsFile(tmp_path / "t.safetensors").view("w")
    assert view.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(view.astype(np.float32), x.float().numpy())
    spec = [("w", view.shape, view.dtype)]
    safetensors_io.write_file(tmp_path / "back.safetensors", spec, [np.asarray(view)])
    assert torch.equal(torch_load(tmp_path / "back.safetensors")["w"], x)


def test_the_safetensors_package_reads_what_jaxlm_writes(tmp_path):
    specs = [(n, a.shape, a.dtype) for n, a in ARRAYS.items()]
    safetensors_io.write_file(tmp_path / "y.safetensors", specs, ARRAYS.values())
    back = safetensors_numpy.load_file(tmp_path / "y.safetensors")
    assert sorted(back) == sorted(ARRAYS)
    for name, want in ARRAYS.items():
        np.testing.assert_array_equal(back[name], want)


def test_write_dir_shards_with_an_index(tmp_path):
    arrays = {f"t{i}": np.full((256,), i, np.float32) for i in range(5)}  # 1 KiB each
    specs = [(n, a.shape, a.dtype) for n, a in arrays.items()]
    files = safetensors_io.write_dir(tmp_path, specs, arrays.__getitem__, max_shard_bytes=2048)
    assert [f.name for f in files] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / safetensors_io.INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    weights = safetensors_io.SafetensorsDir(tmp_path)
    assert weights.names() == sorted(arrays)
    for name, want in arrays.items():
        np.testing.assert_array_equal(weights.view(name), want)


def test_wrong_tensor_is_refused_before_the_file_is_replaced(tmp_path):
    path = tmp_path / "z.safetensors"
    with pytest.raises(ValueError, match=r"tensor 'a': expected \(2,\) float32, got \(3,\)"):
        safetensors_io.write_file(path, [("a", (2,), np.float32)], [np.zeros(3, np.float32)])
    assert not path.exists()


def test_truncated_file_is_reported(tmp_path):
    path = tmp_path / "cut.safetensors"
    safetensors_numpy.save_file({"w": np.ones((100,), np.float32)}, path)
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match=r"'w'.*does not fit its byte range.*truncated"):
        safetensors_io.SafetensorsFile(path)
    path.write_bytes(b"\x01\x02")
    with pytest.raises(ValueError, match="not a safetensors file"):
        safetensors_io.SafetensorsFile(path)
