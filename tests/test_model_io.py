"""Model files: save_model / load_model round trips, atomic writes, and clear errors for
foreign, truncated, corrupted, too-new and malicious files (loading never unpickles)."""

from __future__ import annotations

import json
import os
import pickle
import struct

import numpy as np
import pytest
import torch

import latentspace as ls
from latentspace.models import PCA, VAE, Autoencoder, ConvAutoencoder, ModelFileError
from latentspace.models import io as model_io

pytestmark = pytest.mark.usefixtures("single_threaded")


def _trained_like(model):
    """Non-default weights, so a round trip that silently re-initialised would show."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def _models(rng):
    torch.manual_seed(0)
    return {
        "PCA": PCA(3, whiten=True).fit(rng.random((40, 12))),
        "Autoencoder": _trained_like(Autoencoder(12, 3, hidden=(16, 8), activation="gelu", output="sigmoid")),
        "VAE": _trained_like(VAE(12, 3, hidden=(16,), beta=0.5, kl_warmup=3)),
        "ConvAutoencoder": _trained_like(ConvAutoencoder((1, 8, 8), 4, channels=(4, 8), activation="elu")),
    }


def _input(name, rng):
    shape = (1, 8, 8) if name == "ConvAutoencoder" else (12,)
    return rng.random((9, *shape)).astype(np.float32)


@pytest.mark.parametrize("name", ["PCA", "Autoencoder", "VAE", "ConvAutoencoder"])
def test_round_trip_gives_identical_outputs(tmp_path, rng, name):
    model = _models(rng)[name]
    path = tmp_path / "model.safetensors"
    ls.save_model(model, path)
    loaded = ls.load_model(path)
    assert type(loaded) is type(model)
    assert loaded.config() == model.config()
    assert not loaded.training
    x = _input(name, rng)
    np.testing.assert_array_equal(loaded.encode(x), model.encode(x))
    np.testing.assert_array_equal(loaded(x), model(x))
    z = model.encode(x)
    np.testing.assert_array_equal(loaded.decode(z), model.decode(z))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    if name == "VAE":
        assert loaded.beta == 0.5 and loaded.kl_warmup == 3
        gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
        torch.testing.assert_close(loaded.objective(torch.from_numpy(x), generator=gen())["loss"],
                                   model.objective(torch.from_numpy(x), generator=gen())["loss"], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["PCA", "Autoencoder", "VAE", "ConvAutoencoder"])
def test_a_float64_model_comes_back_float64(tmp_path, rng, name):
    """A model converted with .double() is saved in float64 and loaded in float64, its weights
    exactly (built from its config in float32, it was cast down silently)."""
    model = _models(rng)[name].double()
    ls.save_model(model, tmp_path / "m.safetensors")
    loaded = ls.load_model(tmp_path / "m.safetensors")
    for key, value in model.state_dict().items():
        assert loaded.state_dict()[key].dtype == torch.float64 and torch.equal(loaded.state_dict()[key], value), key
    x = _input(name, rng).astype(np.float64)
    np.testing.assert_array_equal(loaded.encode(x), model.encode(x))


def test_file_is_plain_safetensors_with_the_config(tmp_path, rng):
    from safetensors import safe_open

    model = _models(rng)["VAE"]
    path = tmp_path / "vae.safetensors"
    ls.save_model(model, path)
    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()["latentspace"])
        names = set(f.keys())
    assert info["format"] == "latentspace-model" and info["format_version"] == 1
    assert info["class"] == "VAE" and info["config"] == model.config()
    assert names == set(model.state_dict())


def test_save_accepts_str_path_overwrites_and_leaves_no_temp_files(tmp_path, rng):
    models = _models(rng)
    path = tmp_path / "m.safetensors"
    ls.save_model(models["Autoencoder"], str(path))
    ls.save_model(models["VAE"], path)
    assert isinstance(ls.load_model(str(path)), VAE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_interrupted_save_keeps_the_old_file(tmp_path, rng, monkeypatch):
    models = _models(rng)
    path = tmp_path / "m.safetensors"
    ls.save_model(models["Autoencoder"], path)
    before = path.read_bytes()

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupt)
    with pytest.raises(KeyboardInterrupt):
        ls.save_model(models["VAE"], path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_save_fsyncs_before_rename(tmp_path, rng, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    ls.save_model(_models(rng)["PCA"], tmp_path / "p.safetensors")
    assert "replace" in calls and "fsync" in calls[: calls.index("replace")]


def test_load_on_a_device_and_errors_for_bad_devices(tmp_path, rng):
    path = tmp_path / "m.safetensors"
    ls.save_model(_models(rng)["Autoencoder"], path)
    assert next(ls.load_model(path, device=torch.device("cpu")).parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match=r"device: expected 'cpu', 'cuda' or 'cuda:N', got 'gpu'"):
        ls.load_model(path, device="gpu")


@pytest.mark.parametrize("device", ["meta", torch.device("meta"), "auto", "tpu"])
def test_load_model_checks_the_device_as_encode_does(tmp_path, rng, device):
    """The same check, and message, as encode(..., device=): 'meta' (weights without storage)
    was accepted, and the check runs before the file is read."""
    path = tmp_path / "m.safetensors"
    ls.save_model(_models(rng)["Autoencoder"], path)
    with pytest.raises(ValueError) as from_load:
        ls.load_model(path, device=device)
    with pytest.raises(ValueError) as from_encode:
        ls.encode(ls.load_model(path), np.zeros((1, 12), np.float32), device=device)
    assert str(from_load.value) == str(from_encode.value)
    assert str(from_load.value).startswith("device: ")
    with pytest.raises(ValueError, match="device: "):
        ls.load_model(tmp_path / "missing.safetensors", device=device)  # not FileNotFoundError


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_load_model_on_cuda_without_a_gpu_is_a_clear_error(tmp_path, rng, device):
    """Was torch's AssertionError 'Torch not compiled with CUDA enabled', after the file was read."""
    path = tmp_path / "m.safetensors"
    ls.save_model(_models(rng)["Autoencoder"], path)
    with pytest.raises(ValueError, match="device: .* asked for, but torch sees no CUDA GPU; use 'cpu'"):
        ls.load_model(path, device=device)


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="^model: PCA is not fitted: call fit"):
        ls.save_model(PCA(2), tmp_path / "p.safetensors")
    with pytest.raises(TypeError, match="model: expected one of PCA, Autoencoder, VAE, ConvAutoencoder, got Linear"):
        ls.save_model(torch.nn.Linear(2, 2), tmp_path / "l.safetensors")

    class MyVAE(VAE):
        pass

    with pytest.raises(TypeError, match="got MyVAE"):
        ls.save_model(MyVAE(4, 2), tmp_path / "v.safetensors")
    with pytest.raises(IsADirectoryError):
        ls.save_model(VAE(4, 2), tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------
# Bad files


def _error(path) -> str:
    with pytest.raises(ModelFileError) as info:
        ls.load_model(path)
    return str(info.value)


def test_model_file_error_is_a_value_error():
    assert issubclass(ModelFileError, ValueError)
    assert ls.ModelFileError is ModelFileError


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        ls.load_model(tmp_path / "none.safetensors")


@pytest.mark.parametrize("content", [b"", b"abc", b"\x00" * 7, os.urandom(4096), b"PK\x03\x04" + b"\x00" * 100,
                                     b"LSPACEIX" + b"\x01" * 100])
def test_foreign_bytes(tmp_path, content):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    assert "not a latentspace model file" in _error(path)


def test_an_index_file_is_not_a_model(tmp_path, rng):
    index = ls.FlatIndex(4)
    index.add(rng.random((5, 4)).astype(np.float32))
    index.save(tmp_path / "i.lsidx")
    assert "not a latentspace model file" in _error(tmp_path / "i.lsidx")


def test_foreign_safetensors_file(tmp_path):
    import safetensors.torch

    path = tmp_path / "hf.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(3, 3)}, str(path), metadata={"format": "pt"})
    assert "without a latentspace model config" in _error(path)
    safetensors.torch.save_file({"weight": torch.zeros(3, 3)}, str(path))
    assert "without a latentspace model config" in _error(path)


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickles_are_never_unpickled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, writer in [("model.pt", lambda p: torch.save({"x": _Boom()}, p)),
                         ("model.pkl", lambda p: p.write_bytes(pickle.dumps(_Boom())))]:
        path = tmp_path / name
        writer(path)
        assert "not a latentspace model file" in _error(path)
    assert not (tmp_path / "pwned").exists()


def _saved(tmp_path, rng, name="VAE"):
    path = tmp_path / "m.safetensors"
    ls.save_model(_models(rng)[name], path)
    return path


def test_truncated_files(tmp_path, rng):
    path = _saved(tmp_path, rng)
    data = path.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    for size in (4, 8, 20, header_end - 1, header_end, header_end + 10, len(data) - 1):
        path.write_bytes(data[:size])
        message = _error(path)
        assert "truncated" in message or "not a latentspace model" in message or "corrupted" in message, (size, message)


def test_trailing_bytes(tmp_path, rng):
    path = _saved(tmp_path, rng)
    path.write_bytes(path.read_bytes() + b"\x00" * 16)
    assert "corrupted" in _error(path)


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_weight_byte(tmp_path, rng, where):
    path = _saved(tmp_path, rng)
    data = bytearray(path.read_bytes())
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    position = {"first": header_end, "middle": (header_end + len(data)) // 2, "last": len(data) - 1}[where]
    data[position] ^= 0x10
    path.write_bytes(bytes(data))
    assert "weights checksum mismatch" in _error(path)


@pytest.mark.parametrize("name", ["PCA", "VAE", "ConvAutoencoder"])
def test_every_flipped_header_byte_is_caught(tmp_path, rng, name):
    path = _saved(tmp_path, rng, name)
    original = path.read_bytes()
    header_end = 8 + struct.unpack("<Q", original[:8])[0]
    for position in range(header_end):
        for mask in (0x01, 0x80):
            data = bytearray(original)
            data[position] ^= mask
            path.write_bytes(bytes(data))
            with pytest.raises(ModelFileError):
                ls.load_model(path)


def _rewrite_info(path, change):
    """Rewrites the config JSON (with a valid checksum), so only the content is wrong."""
    import zlib

    from safetensors import safe_open
    import safetensors.torch

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(metadata["latentspace"])
    change(info, tensors)
    text = json.dumps(info)
    metadata["latentspace"] = text
    metadata["latentspace_crc32"] = f"{zlib.crc32(text.encode()):08x}"
    metadata["tensors_crc32"] = f"{model_io._tensors_crc32(tensors):08x}"
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)


def test_too_new_unknown_and_mismatched(tmp_path, rng):
    path = _saved(tmp_path, rng)
    _rewrite_info(path, lambda info, t: info.update(format_version=2))
    assert "written by a newer latentspace" in _error(path)

    path = _saved(tmp_path, rng)
    _rewrite_info(path, lambda info, t: info.update({"class": "Transformer"}))
    assert "unknown model type 'Transformer'" in _error(path)

    path = _saved(tmp_path, rng)
    _rewrite_info(path, lambda info, t: info["config"].update(latent_dim=5))
    assert "weights do not match the config" in _error(path)

    path = _saved(tmp_path, rng)
    _rewrite_info(path, lambda info, t: info["config"].update(activation="swish"))
    assert "bad VAE config" in _error(path)

    path = _saved(tmp_path, rng)
    _rewrite_info(path, lambda info, t: info["config"].pop("input_dim"))
    assert "bad VAE config" in _error(path)

    path = _saved(tmp_path, rng)
    _rewrite_info(path, lambda info, t: t.pop("decoder.0.bias"))
    assert "weights do not match the config" in _error(path)

    path = _saved(tmp_path, rng)
    _rewrite_info(path, lambda info, t: t.update(extra=torch.zeros(2)))
    assert "weights do not match the config" in _error(path)


@pytest.mark.parametrize("change", [
    lambda info: info.update(format_version=1.5),  # int() read it as 1
    lambda info: info.update(format_version=float("inf")),  # int(): OverflowError
    lambda info: info.update(format_version=True),
    lambda info: info.update(format_version="1"),
    lambda info: info.update({"class": ["VAE"]}),  # unhashable: TypeError
    lambda info: info.update({"class": {"VAE": 1}}),
], ids=["version-1.5", "version-inf", "version-true", "version-str", "class-list", "class-dict"])
def test_config_fields_of_the_wrong_type(tmp_path, rng, change):
    """A crafted config with a valid checksum: ModelFileError, never a TypeError or an
    OverflowError from inside the loader, nor a float version read as an int."""
    path = _saved(tmp_path, rng)
    _rewrite_info(path, lambda info, t: change(info))
    message = _error(path)
    assert "unreadable config" in message or "unknown model type" in message


@pytest.mark.parametrize("name, change", [
    ("PCA", lambda config: config.update(input_dim=2**61)),
    ("PCA", lambda config: config.update(input_dim=10**12, latent_dim=10**6)),
    ("Autoencoder", lambda config: config.update(input_dim=13)),
    ("ConvAutoencoder", lambda config: config.update(input_shape=[1, 4000, 4000])),
], ids=["pca-numel-overflow", "pca-exabytes", "ae-other-size", "conv-other-size"])
def test_config_sizes_are_checked_against_the_weights_before_any_memory(tmp_path, rng, monkeypatch, name, change):
    """A crafted config (valid checksums) whose sizes disagree with the file's own tensors:
    ModelFileError, before the model's memory is allocated. The model used to be built first,
    at the config's sizes: a PCA asking for 2**61 features leaked torch's RuntimeError, and a
    1 KB file could make load_model allocate (and initialise) any amount of memory up to the
    2**40-parameter cap."""
    path = tmp_path / "m.safetensors"
    ls.save_model(_models(rng)[name], path)
    _rewrite_info(path, lambda info, t: change(info["config"]))
    built_on = []
    for layer in (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d):
        real = layer.reset_parameters
        monkeypatch.setattr(layer, "reset_parameters",
                            lambda self, real=real: built_on.append(self.weight.device.type) or real(self))
    with pytest.raises(ModelFileError, match=r"corrupted model file \((weights do not match|bad PCA config)"):
        ls.load_model(path)
    assert set(built_on) <= {"meta"}


@pytest.mark.parametrize("path", [None, 3, ["m.safetensors"]])
def test_a_path_that_is_not_one_is_named(tmp_path, path):
    """os.fspath's own TypeError ("expected str, bytes or os.PathLike object, not NoneType")
    named no argument. (A bytes path is one: taken since the twenty-fourth session, as the
    datasets' loaders and index files take it; tests/test_atomic.py.)"""
    with pytest.raises(TypeError, match=r"^path: expected a str, bytes or os.PathLike \(a file's path\)"):
        ls.load_model(path)
    with pytest.raises(TypeError, match=r"^path: expected a str, bytes or os.PathLike \(a file's path\)"):
        ls.save_model(Autoencoder(4, 2), path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("header", [
    b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',  # a foreign safetensors file
    b"not json at all",
])
def test_a_large_file_that_is_not_a_model_is_refused_without_reading_it_whole(tmp_path, header):
    """load_model read the whole file into memory before looking at its header: passing a
    large data file by mistake took its size in memory (1 GiB for a 1 GiB file, and the
    machine's memory for a larger one) only to refuse it."""
    import tracemalloc

    path = tmp_path / "data.bin"
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(64 << 20)  # (sparse: no disk taken)
    tracemalloc.start()
    try:
        with pytest.raises(ModelFileError):
            ls.load_model(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_a_model_file_of_the_wrong_size_is_refused_before_its_weights_are_read(tmp_path, rng, monkeypatch):
    """The header says where the weights end: a file cut short or with bytes after them is
    refused from its size, before the (possibly huge) rest is read."""
    path = _saved(tmp_path, rng)
    data = path.read_bytes()
    reads = []
    real = model_io._read_weights
    monkeypatch.setattr(model_io, "_read_weights", lambda *args: reads.append(args) or real(*args))
    for bad in (data[:-1], data + b"\x00" * (32 << 20)):
        path.write_bytes(bad)
        message = _error(path)
        assert ("truncated" if len(bad) < len(data) else "bytes after its weights") in message, message
    assert reads == []
    path.write_bytes(data)
    ls.load_model(path)
    assert len(reads) == 1
