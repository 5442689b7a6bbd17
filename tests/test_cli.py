"""The `latentspace` command line (run as `python -m latentspace`, as a subprocess)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

import latentspace


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ)
    full_env.pop("LATENTSPACE_SIMD", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "latentspace", *args], capture_output=True,
                          text=True, timeout=180, env=full_env)


def test_info():
    result = _cli("info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"latentspace {latentspace.__version__}" in out
    info = latentspace.build_info()
    assert info["hardware_simd_level"] in out
    assert "SIMD level" in out and "threads" in out.lower() and "CUDA" in out


def test_info_json():
    result = _cli("info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    expected = latentspace.build_info()
    assert set(info) == set(expected)
    assert info["version"] == latentspace.__version__
    assert info["hardware_simd_level"] == expected["hardware_simd_level"]
    assert info["cuda_compiled"] == expected["cuda_compiled"]
    assert info["cuda_architectures"] == expected["cuda_architectures"]
    assert info["gpu_visible"] == expected["gpu_visible"]
    assert isinstance(info["num_threads"], int) and info["num_threads"] >= 1


def test_info_json_reflects_environment():
    result = _cli("info", "--json", env={"LATENTSPACE_SIMD": "scalar", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["simd_level"] == "scalar"
    assert info["num_threads"] == 1


@pytest.mark.skipif(shutil.which("latentspace") is None, reason="console script not on PATH")
def test_console_script_info_json():
    result = subprocess.run(["latentspace", "info", "--json"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["version"] == latentspace.__version__


def _table(out: str) -> dict[str, tuple[int, float, float]]:
    """The demo's held-out table: name -> (dims, reconstruction MSE, k-NN agreement)."""
    rows = re.findall(r"^    (raw pixels|PCA|VAE|Autoencoder|ConvAutoencoder)\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)$",
                      out, flags=re.M)
    return {name: (int(d), float(m), float(a)) for name, d, m, a in rows}


def test_demo():
    """The default demo (a VAE trained as shipped): it meets the bars of docs/models.md."""
    result = _cli("demo", "--examples", "1")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "1,797" in out and "1,258 training / 539 held-out" in out
    table = _table(out)
    assert set(table) == {"raw pixels", "PCA", "VAE"}, out
    assert table["PCA"][0] == table["VAE"][0] == 8 and table["raw pixels"][0] == 64
    # the bars: lower held-out MSE than PCA at 8 dims, 10-NN agreement at least PCA's
    assert table["VAE"][1] < table["PCA"][1], out
    assert table["VAE"][2] >= table["PCA"][2], out
    assert re.search(r"held-out digits \(539\).*10-NN label agreement", out)
    assert 0.88 < table["raw pixels"][2] < 0.9
    match = re.search(r"10-NN label agreement in the VAE's latent space \(all digits\): ([0-9.]+)", out)
    assert match and float(match.group(1)) > 0.85
    assert "FlatIndex(dim=8, metric='l2', ntotal=1797)" in out
    # one example digit with its neighbours in the latent space and their labels
    queries = re.findall(r"digit #(\d+) \(label (\d)\) and its (\d+) nearest neighbours in the VAE", out)
    assert len(queries) == 1, out
    neighbour_labels = re.findall(r"#\d+ label (\d)", out)
    assert len(neighbour_labels) == int(queries[0][2]) == 4
    assert all(0 <= int(label) <= 9 for label in neighbour_labels)
    assert "d=" in out
    # its duration is reported (the < 60 s goal is measured in benchmarks/bench_demo.py)
    assert re.search(r"demo finished in [0-9.]+ s", out)


def test_demo_options():
    result = _cli("demo", "--examples", "2", "-k", "3", "--show", "2", "--seed", "5",
                  "--threads", "1", "--epochs", "2", "--models", "autoencoder,conv", "--latent-dim", "4")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    table = _table(out)
    assert set(table) == {"raw pixels", "PCA", "Autoencoder", "ConvAutoencoder"}, out
    assert table["PCA"][0] == table["Autoencoder"][0] == 4
    assert "3-NN label agreement" in out
    assert "2 epochs" in out
    assert "1 threads" in out
    assert "over the Autoencoder codes" in out
    assert len(re.findall(r"digit #\d+ \(label \d\)", out)) == 2
    assert len(re.findall(r"#\d+ label \d", out)) == 4


def test_demo_bad_models_reports_error():
    result = _cli("demo", "--models", "vae,gan")
    assert result.returncode == 2
    assert "--models: expected a comma-separated list of vae, autoencoder, conv" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_bad_threads_reports_error():
    result = _cli("demo", "--threads", "0")
    assert result.returncode == 2
    assert "error" in result.stderr and "n: expected an integer >= 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors():
    result = _cli()
    assert result.returncode == 2
    assert "usage" in result.stderr.lower()
    result = _cli("frobnicate")
    assert result.returncode == 2


# ---------------------------------------------------------------------------------------
# latentspace train (one run as a subprocess, the rest in-process: no torch import each)


def _main(capsys, *args: str) -> tuple[int, str, str]:
    import torch

    from latentspace.cli import main

    previous = torch.get_num_threads()
    try:
        code = main(list(args) + ["--threads", "1"])  # tiny models: see conftest.single_threaded
    finally:
        torch.set_num_threads(previous)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_digits_vae(tmp_path):
    out = tmp_path / "run"
    result = _cli("train", "digits", "--model", "vae", "--latent-dim", "4", "--epochs", "3",
                  "--hidden", "32", "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "VAE (latent_dim 4) on the scikit-learn digits, 1,797 rows of shape (64,)" in result.stdout
    assert "3 epochs" in result.stdout and "best validation loss" in result.stdout
    model = latentspace.load_model(out / "model.safetensors")
    assert isinstance(model, latentspace.VAE) and model.latent_dim == 4 and model.output == "sigmoid"
    history = json.loads((out / "history.json").read_text())
    assert history["model"] == "VAE" and history["epochs_run"] == 3 and len(history["val_loss"]) == 3
    assert history["config"]["hidden"] == [32]
    assert sorted(p.name for p in out.iterdir()) == ["history.json", "model.safetensors"]


def test_train_npy_file_with_linear_output_and_progress(tmp_path, capsys):
    import numpy as np

    data = np.random.default_rng(0).normal(size=(300, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    code, out, err = _main(capsys, "train", str(tmp_path / "x.npy"), "--model", "autoencoder", "--latent-dim", "2",
                           "--epochs", "2", "--hidden", "8", "--out", str(tmp_path / "ae"))
    assert code == 0, err
    assert "samples/s" in err and "epoch 2/2" in err  # the tqdm bar
    model = latentspace.load_model(tmp_path / "ae" / "model.safetensors")
    assert isinstance(model, latentspace.Autoencoder) and model.output == "linear"  # data not in [0, 1]


def test_train_pca_and_conv(tmp_path, capsys):
    code, out, err = _main(capsys, "train", "digits", "--model", "pca", "--latent-dim", "8",
                           "--out", str(tmp_path / "pca"))
    assert code == 0, err
    assert "of the variance kept" in out
    assert isinstance(latentspace.load_model(tmp_path / "pca" / "model.safetensors"), latentspace.PCA)
    history = json.loads((tmp_path / "pca" / "history.json").read_text())
    assert len(history["explained_variance_ratio"]) == 8

    code, out, err = _main(capsys, "train", "digits", "--model", "conv", "--latent-dim", "3", "--epochs", "1",
                           "--channels", "4", "--out", str(tmp_path / "conv"), "--no-progress")
    assert code == 0, err
    model = latentspace.load_model(tmp_path / "conv" / "model.safetensors")
    assert isinstance(model, latentspace.ConvAutoencoder) and model.input_shape == (1, 8, 8)


def test_train_npz_images_for_conv(tmp_path, capsys):
    import numpy as np

    images = np.random.default_rng(0).random((64, 12, 10)).astype(np.float32)  # (n, H, W)
    np.savez(tmp_path / "imgs.npz", images=images, labels=np.arange(64))
    code, out, err = _main(capsys, "train", str(tmp_path / "imgs.npz"), "--key", "images", "--model", "conv",
                           "--latent-dim", "2", "--epochs", "1", "--channels", "4", "--out", str(tmp_path / "c"),
                           "--no-progress")
    assert code == 0, err
    assert latentspace.load_model(tmp_path / "c" / "model.safetensors").input_shape == (1, 12, 10)


def test_train_interrupted_keeps_the_checkpoint_and_exits_130(tmp_path, capsys, monkeypatch):
    from latentspace import training

    real_train = training.train

    def interrupted_after_two_epochs(*args, **kwargs):
        def stop(record):
            if record["epoch"] == 1:
                raise KeyboardInterrupt
        return real_train(*args, **{**kwargs, "callback": stop})

    monkeypatch.setattr(training, "train", interrupted_after_two_epochs)
    code, out, err = _main(capsys, "train", "digits", "--model", "autoencoder", "--epochs", "50",
                           "--hidden", "8", "--out", str(tmp_path / "r"), "--no-progress")
    assert code == 130
    assert "interrupted (Ctrl-C): the best checkpoint is kept" in err
    assert isinstance(latentspace.load_model(tmp_path / "r" / "model.safetensors"), latentspace.Autoencoder)
    assert json.loads((tmp_path / "r" / "history.json").read_text())["interrupted"] is True


def test_train_errors(tmp_path, capsys):
    code, out, err = _main(capsys, "train", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "o"))
    assert code == 2 and "latentspace train: error:" in err
    code, out, err = _main(capsys, "train", "digits", "--model", "pca", "--latent-dim", "65",
                           "--out", str(tmp_path / "o"))
    assert code == 2 and "latent_dim: PCA(latent_dim=65) cannot exceed the input dimension" in err
    code, out, err = _main(capsys, "train", "digits", "--model", "conv", "--image-shape", "1,9,9",
                           "--out", str(tmp_path / "o"))
    assert code == 2 and "X: expected shape" in err
    code, out, err = _main(capsys, "train", "digits", "--hidden", "32,x", "--out", str(tmp_path / "o"))
    assert code == 2 and "--hidden: expected comma-separated integers" in err
    code, out, err = _main(capsys, "train", "digits", "--loss", "bce", "--output", "linear",
                           "--out", str(tmp_path / "o"))
    assert code == 2 and "loss: 'bce' needs a model whose output is a probability" in err
    with pytest.raises(SystemExit):
        _main(capsys, "train", "digits", "--model", "gan", "--out", str(tmp_path / "o"))
    assert "invalid choice" in capsys.readouterr().err
