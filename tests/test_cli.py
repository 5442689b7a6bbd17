"""The `latentspace` command line (run as `python -m latentspace`, as a subprocess)."""

from __future__ import annotations

import json
import os
import re
import shlex
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
    result = _cli("info", "--json", env={"LATENTSPACE_SIMD": "scalar", "OMP_NUM_THREADS": "1",
                                         "LATENTSPACE_CUDA_LOSSES": "native"})
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["simd_level"] == "scalar"
    assert info["num_threads"] == 1
    assert info["cuda_losses"] == "native"  # (asked for: even a build without CUDA says so, and its losses refuse CUDA tensors)


def test_info_says_what_losses_and_the_encoder_run_on_a_gpu():
    result = _cli("info", env={"LATENTSPACE_CUDA_LOSSES": "torch", "LATENTSPACE_CUDA_ENCODER": "native"})
    assert result.returncode == 0, result.stderr
    assert "losses on a GPU   : torch's ops (LATENTSPACE_CUDA_LOSSES" in result.stdout
    assert "encoder on a GPU  : CUDA kernels (LATENTSPACE_CUDA_ENCODER" in result.stdout
    result = _cli("info", env={"LATENTSPACE_CUDA_LOSSES": "bogus", "LATENTSPACE_CUDA_ENCODER": "torch"})
    assert result.returncode == 0, result.stderr
    assert "losses on a GPU   : invalid (LATENTSPACE_CUDA_LOSSES: expected" in result.stdout
    assert "encoder on a GPU  : the model's torch code (LATENTSPACE_CUDA_ENCODER" in result.stdout


@pytest.mark.skipif(shutil.which("latentspace") is None, reason="console script not on PATH")
def test_console_script_info_json():
    result = subprocess.run(["latentspace", "info", "--json"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["version"] == latentspace.__version__


_TABLE_ROW = re.compile(r"^    (raw pixels|PCA|VAE|Autoencoder|ConvAutoencoder|VAE \+ relevance|Autoencoder \+ relevance|"
                        r"ConvAutoencoder \+ relevance|metric-learned AE)\s+(\d+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)$",
                        flags=re.M)


def _table(out: str) -> dict[str, tuple[int, float, float, float]]:
    """The demo's held-out table: name -> (dims, reconstruction MSE, k-NN agreement, trustworthiness)."""
    return {name: (int(d), float(m), float(a), float(t)) for name, d, m, a, t in _TABLE_ROW.findall(out)}


def test_demo(tmp_path):
    """The default demo (a VAE and a metric-learned autoencoder trained as shipped): it meets
    the bars of docs/models.md and docs/similarity.md, and writes its pictures."""
    result = _cli("demo", "--examples", "1", "--out", str(tmp_path / "pictures"))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "1,797" in out and "1,258 training / 539 held-out" in out
    table = _table(out)
    assert set(table) == {"raw pixels", "PCA", "VAE", "VAE + relevance", "metric-learned AE"}, out
    assert table["PCA"][0] == table["VAE"][0] == table["metric-learned AE"][0] == 8 and table["raw pixels"][0] == 64
    # the bars: lower held-out MSE than PCA at 8 dims, 10-NN agreement at least PCA's
    assert table["VAE"][1] < table["PCA"][1], out
    assert table["VAE"][2] >= table["PCA"][2], out
    # issue 7's bars: relevance weighting beats the plain space; metric learning reaches 0.95
    assert table["VAE + relevance"][2] > table["VAE"][2], out
    assert table["metric-learned AE"][2] >= 0.95, out
    assert all(0.5 < row[3] <= 1.0 for row in table.values()), out
    assert re.search(r"held-out digits \(539\).*10-NN label agreement.*trustworthiness \(10\)", out)
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
    # the pictures, where it says
    names = ["latent_map.png", "reconstructions.png", "interpolation.png", "neighbors.png", "relevance.png"]
    assert f"pictures: 5 PNG files in {(tmp_path / 'pictures').resolve()}" in out
    for name in names:
        data = (tmp_path / "pictures" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5000, name
    # its duration is reported (the < 60 s goal is measured in benchmarks/bench_demo.py)
    assert re.search(r"demo finished in [0-9.]+ s", out)


def test_demo_options(tmp_path):
    result = _cli("demo", "--examples", "2", "-k", "3", "--show", "2", "--seed", "5",
                  "--threads", "1", "--epochs", "2", "--models", "autoencoder,conv", "--latent-dim", "4",
                  "--no-metric-learning", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    table = _table(out)
    assert set(table) == {"raw pixels", "PCA", "Autoencoder", "Autoencoder + relevance", "ConvAutoencoder",
                          "ConvAutoencoder + relevance"}, out
    assert table["PCA"][0] == table["Autoencoder"][0] == 4
    assert "3-NN label agreement" in out
    assert "2 epochs" in out
    assert "1 threads" in out
    assert "over the Autoencoder codes" in out
    assert len(re.findall(r"digit #\d+ \(label \d\)", out)) == 2
    assert len(re.findall(r"#\d+ label \d", out)) == 4
    assert len(list(tmp_path.glob("*.png"))) == 5


def test_demo_out_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    result = _cli("demo", "--out", str(tmp_path / "file"))
    assert result.returncode == 2
    assert "--out:" in result.stderr and "is not a folder" in result.stderr


@pytest.mark.parametrize("option,value,least", [("--epochs", "0", 1), ("--examples", "-1", 0), ("--show", "0", 1)])
def test_demo_counts_are_checked_as_they_are_parsed(option, value, least, capsys):
    """--epochs 0 meant the default, --examples -1 reached numpy's error: refused by name."""
    from latentspace.cli import build_parser

    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["demo", option, value])
    assert caught.value.code == 2
    assert f"error: argument {option}: expected an integer >= {least}, got '{value}'" in capsys.readouterr().err


def test_demo_bad_models_reports_error():
    result = _cli("demo", "--models", "vae,gan")
    assert result.returncode == 2
    assert "--models: expected a comma-separated list of vae, autoencoder, conv" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_bad_threads_reports_error():
    result = _cli("demo", "--threads", "0")
    assert result.returncode == 2
    assert "error: argument --threads: expected an integer >= 1, got '0'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["demo"], ["train", "digits"], ["encode", "m.st", "x.npy"],
                                     ["index", "build", "x.npy"], ["search", "i.lsidx", "q.npy"],
                                     ["plot", "map", "m.st", "x.npy"]])
@pytest.mark.parametrize("threads", ["0", "-2", "two"])
def test_every_threads_option_is_checked_as_it_is_parsed(command, threads, capsys):
    """Every command's --threads: a whole number >= 1, refused by name while parsing (one
    line, exit 2; set_num_threads would have named its own argument, n)."""
    from latentspace.cli import build_parser

    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args([*command, "--threads", threads])
    assert caught.value.code == 2
    assert f"error: argument --threads: expected an integer >= 1, got '{threads}'" in capsys.readouterr().err


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


def test_train_npy_file_with_linear_output_and_progress(tmp_path, capsys, monkeypatch):
    import numpy as np

    data = np.random.default_rng(0).normal(size=(300, 10)).astype(np.float32)
    np.save(tmp_path / "x.npy", data)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)  # the bar is for a terminal
    code, out, err = _main(capsys, "train", str(tmp_path / "x.npy"), "--model", "autoencoder", "--latent-dim", "2",
                           "--epochs", "2", "--hidden", "8", "--out", str(tmp_path / "ae"))
    assert code == 0, err
    assert "samples/s" in err and "epoch 2/2" in err  # the tqdm bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)  # a log file: no bar in it
    code, out, err = _main(capsys, "train", str(tmp_path / "x.npy"), "--model", "autoencoder", "--latent-dim", "2",
                           "--epochs", "1", "--hidden", "8", "--out", str(tmp_path / "ae2"))
    assert code == 0 and "samples/s" not in err, err
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


def _send_sigterm_to_self():
    import signal
    import time

    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(5)  # the handler raises in this thread at its next bytecode; never sleeps it out


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_mid_write_removes_the_temporary_file_and_exits_143(pipeline_files, capsys, monkeypatch):
    """SIGTERM (a scheduler, `timeout`) unwinds like Ctrl-C: the atomic write's temporary
    file is removed (the default action killed the process and left it), nothing half-written
    takes the output's name, the exit status is 128 + 15, and the handler before is restored."""
    import signal

    tmp, _, _, _ = pipeline_files
    before = signal.getsignal(signal.SIGTERM)

    def encode_until_terminated(self, *args, **kwargs):
        assert any(name.endswith(".tmp") for name in _files(tmp))  # the codes' temporary file exists
        _send_sigterm_to_self()

    monkeypatch.setattr(latentspace.Encoder, "_encode_to", encode_until_terminated)  # (encode's steps)
    files = _files(tmp)
    code, out, err = _main(capsys, "encode", str(tmp / "model.safetensors"), str(tmp / "x.npy"),
                           "--out", str(tmp / "z.npy"))
    assert code == 143 and "latentspace encode: terminated (SIGTERM)" in err
    assert _files(tmp) == files  # no z.npy, no temporary file
    assert signal.getsignal(signal.SIGTERM) is before


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_sigterm_the_process_ignores_stays_ignored(pipeline_files, capsys, monkeypatch):
    """A process started with SIGTERM ignored (its parent's choice: SIG_IGN is inherited
    across exec) was not stopped by one before the CLI's handler; main() installed its own
    over it and the command ended with 143. As Python does for SIGINT, an ignored SIGTERM
    is left ignored."""
    import signal

    tmp, _, _, _ = pipeline_files
    real = latentspace.Encoder._encode_to
    sent = []

    def encode_after_a_sigterm(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        sent.append(True)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(latentspace.Encoder, "_encode_to", encode_after_a_sigterm)  # (encode's steps)
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        code, out, err = _main(capsys, "encode", str(tmp / "model.safetensors"), str(tmp / "x.npy"),
                               "--out", str(tmp / "z.npy"))
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
    assert sent and code == 0 and "terminated" not in err, err
    assert (tmp / "z.npy").exists()


def test_a_sigterm_of_an_earlier_run_does_not_end_a_later_one_in_a_thread(pipeline_files, capsys):
    """The flag saying that main() got a SIGTERM was reset only where a handler was
    installed (the main thread): after a run that train stopped on SIGTERM (143), a run
    from another thread, which no SIGTERM can reach, also returned 143."""
    import threading

    from latentspace import cli

    tmp, _, _, _ = pipeline_files
    cli._received["SIGTERM"] = True  # as left by a training run that a SIGTERM stopped
    codes = []
    worker = threading.Thread(target=lambda: codes.append(_main(capsys, "encode", str(tmp / "model.safetensors"),
                                                                str(tmp / "x.npy"), "--out", str(tmp / "z.npy"))[0]))
    worker.start()
    worker.join()
    assert codes == [0]


def _raise_keyboard_interrupt():
    raise KeyboardInterrupt


@pytest.mark.parametrize("stop,status", [(_raise_keyboard_interrupt, 130), (_send_sigterm_to_self, 143)],
                         ids=["ctrl-c", "sigterm"])
def test_train_interrupted_keeps_the_checkpoint(stop, status, tmp_path, capsys, monkeypatch):
    from latentspace import training

    real_train = training.train

    def stopped_after_two_epochs(*args, **kwargs):
        def callback(record):
            if record["epoch"] == 1:
                stop()
        return real_train(*args, **{**kwargs, "callback": callback})

    monkeypatch.setattr(training, "train", stopped_after_two_epochs)
    code, out, err = _main(capsys, "train", "digits", "--model", "autoencoder", "--epochs", "50",
                           "--hidden", "8", "--out", str(tmp_path / "r"), "--no-progress")
    assert code == status
    assert "interrupted (Ctrl-C or SIGTERM): the best checkpoint is kept" in err
    assert isinstance(latentspace.load_model(tmp_path / "r" / "model.safetensors"), latentspace.Autoencoder)
    assert json.loads((tmp_path / "r" / "history.json").read_text())["interrupted"] is True


def test_values_past_float32_are_refused_without_numpy_warnings(tmp_path):
    import numpy as np

    np.save(tmp_path / "big.npy", np.full((3, 4), 1e39))
    result = _cli("index", "build", str(tmp_path / "big.npy"), "--out", str(tmp_path / "i.lsidx"))
    assert result.returncode == 2 and "row 0 contains NaN or Inf, or values so large" in result.stderr
    assert "Warning" not in result.stderr, result.stderr

def test_train_errors(tmp_path, capsys):
    code, out, err = _main(capsys, "train", str(tmp_path / "missing.npy"), "--out", str(tmp_path / "o"))
    assert code == 2 and "latentspace train: error:" in err
    code, out, err = _main(capsys, "train", "digits", "--model", "pca", "--latent-dim", "65",
                           "--out", str(tmp_path / "o"))
    assert code == 2 and "--latent-dim: PCA(latent_dim=65) cannot exceed the input dimension" in err
    code, out, err = _main(capsys, "train", "digits", "--model", "conv", "--image-shape", "1,9,9",
                           "--out", str(tmp_path / "o"))
    assert code == 2 and "digits: expected shape" in err
    code, out, err = _main(capsys, "train", "digits", "--hidden", "32,x", "--out", str(tmp_path / "o"))
    assert code == 2 and "--hidden: expected comma-separated integers" in err
    code, out, err = _main(capsys, "train", "digits", "--loss", "bce", "--output", "linear",
                           "--out", str(tmp_path / "o"))
    assert code == 2 and "--loss: 'bce' needs a model whose output is a probability" in err
    with pytest.raises(SystemExit):
        _main(capsys, "train", "digits", "--model", "gan", "--out", str(tmp_path / "o"))
    assert "invalid choice" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# The pipeline: latentspace encode -> index build -> search (in-process, like train's tests)


@pytest.fixture
def pipeline_files(tmp_path):
    """A small saved Autoencoder on the digits, the data and raw queries as .npy files."""
    import numpy as np
    import torch

    images, _ = latentspace.datasets.load_digits()
    torch.manual_seed(0)
    model = latentspace.Autoencoder(64, 4, hidden=(16,)).eval()
    latentspace.save_model(model, tmp_path / "model.safetensors")
    np.save(tmp_path / "x.npy", images[:300])
    np.save(tmp_path / "q.npy", images[300:311])
    return tmp_path, model, images[:300], images[300:311]


def _files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_pipeline_matches_the_python_api(pipeline_files, capsys, single_threaded):
    """Bit-identical to the Python API run the same way (one thread, as _main runs the CLI:
    a matmul split over two threads may round its last bit differently)."""
    import numpy as np

    tmp, model, x, q = pipeline_files
    code, out, err = _main(capsys, "encode", str(tmp / "model.safetensors"), str(tmp / "x.npy"),
                           "--out", str(tmp / "z.npy"))
    assert code == 0, err
    encoder = latentspace.Encoder(model)
    assert f"300 rows of {tmp / 'x.npy'} -> {tmp / 'z.npy'}, (300, 4) float32" in out
    assert f"backend: {encoder.backend}" in out and re.search(r"[0-9,]+ rows/s", out)
    z = np.load(tmp / "z.npy")
    np.testing.assert_array_equal(z, latentspace.encode(model, x))

    code, out, err = _main(capsys, "index", "build", str(tmp / "z.npy"), "--out", str(tmp / "z.lsidx"),
                           "--metric", "cosine", "--batch-size", "64")
    assert code == 0, err
    assert "FlatIndex(dim=4, metric='cosine', ntotal=300)" in out
    index = latentspace.load_index(tmp / "z.lsidx")
    np.testing.assert_array_equal(index.vectors(), z)

    code, out, err = _main(capsys, "search", str(tmp / "z.lsidx"), str(tmp / "q.npy"), "-k", "7",
                           "--model", str(tmp / "model.safetensors"), "--out", str(tmp / "r.npz"),
                           "--batch-size", "4")
    assert code == 0, err
    assert "11 queries" in out and "k=7" in out and "queries encoded first" in out
    expected = latentspace.FlatIndex(4, "cosine")
    expected.add(latentspace.encode(model, x))
    codes = latentspace.encode(model, q)
    # searched in the same chunks of 4 (the kernel's path, and its last bits, depend on the count)
    D, I = (np.concatenate(parts) for parts in zip(*(expected.search(codes[s : s + 4], 7) for s in (0, 4, 8))))
    with np.load(tmp / "r.npz") as result:
        assert sorted(result.files) == ["distances", "indices"]
        np.testing.assert_array_equal(result["indices"], I)
        np.testing.assert_array_equal(result["distances"], D)
        assert result["indices"].dtype == np.int64 and result["distances"].dtype == np.float32

    # queries already in the latent space: no --model
    np.save(tmp / "zq.npy", latentspace.encode(model, q))
    code, out, err = _main(capsys, "search", str(tmp / "z.lsidx"), str(tmp / "zq.npy"), "-k", "7",
                           "--out", str(tmp / "r2.npz"), "--mmap")
    assert code == 0, err
    with np.load(tmp / "r2.npz") as result:
        np.testing.assert_array_equal(result["indices"], I)
    assert _files(tmp) == ["model.safetensors", "q.npy", "r.npz", "r2.npz", "x.npy", "z.lsidx", "z.npy",
                           "zq.npy"]  # no temporary files left behind


def test_pipeline_as_subprocesses(pipeline_files):
    import numpy as np

    tmp, model, x, _ = pipeline_files
    result = _cli("encode", str(tmp / "model.safetensors"), str(tmp / "x.npy"), "--out", str(tmp / "z.npy"),
                  "--batch-size", "100", "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no bar when stderr is not a terminal
    result = _cli("index", "build", str(tmp / "z.npy"), "--out", str(tmp / "z.lsidx"))
    assert result.returncode == 0, result.stderr
    result = _cli("search", str(tmp / "z.lsidx"), str(tmp / "z.npy"), "-k", "1", "--out", str(tmp / "r.npz"))
    assert result.returncode == 0, result.stderr
    with np.load(tmp / "r.npz") as r:  # every code finds itself (or an identical code) first
        assert (r["distances"][:, 0] == 0).all()
    result = _cli("index", "build", str(tmp / "missing.npy"), "--out", str(tmp / "i.lsidx"))
    assert result.returncode == 2 and "latentspace index build: error:" in result.stderr
    assert "Traceback" not in result.stderr


def test_encode_npz_hdf5_and_images(tmp_path, capsys, single_threaded):
    import numpy as np
    import torch

    images, _ = latentspace.datasets.load_digits()
    torch.manual_seed(0)
    mlp = latentspace.Autoencoder(64, 3, hidden=(8,)).eval()
    conv = latentspace.ConvAutoencoder((1, 8, 8), 2, channels=(4,)).eval()
    latentspace.save_model(mlp, tmp_path / "mlp.safetensors")
    latentspace.save_model(conv, tmp_path / "conv.safetensors")
    stack = images[:50].reshape(50, 8, 8)
    np.savez(tmp_path / "d.npz", rows=images[:50], stack=stack)

    code, out, err = _main(capsys, "encode", str(tmp_path / "mlp.safetensors"), str(tmp_path / "d.npz"),
                           "--key", "rows", "--out", str(tmp_path / "a.npy"))
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), latentspace.encode(mlp, images[:50]))
    # (n, 8, 8) images: flattened for an MLP, given a channel axis for a ConvAutoencoder
    code, out, err = _main(capsys, "encode", str(tmp_path / "mlp.safetensors"), str(tmp_path / "d.npz"),
                           "--key", "stack", "--out", str(tmp_path / "b.npy"))
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), np.load(tmp_path / "a.npy"))
    code, out, err = _main(capsys, "encode", str(tmp_path / "conv.safetensors"), str(tmp_path / "d.npz"),
                           "--key", "stack", "--out", str(tmp_path / "c.npy"))
    assert code == 0, err
    assert "backend: torch" in out and "not native: ConvAutoencoder" in out
    np.testing.assert_allclose(np.load(tmp_path / "c.npy"), conv.encode(stack[:, None]), rtol=1e-5, atol=1e-6)

    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "ann.hdf5", "w") as f:
        f.create_dataset("train", data=images[:40])
        f.create_dataset("test", data=images[40:45])
        f.create_dataset("neighbors", data=np.zeros((5, 1), dtype=np.int64))
        f.create_dataset("distances", data=np.zeros((5, 1), dtype=np.float32))
        f.attrs["distance"] = "euclidean"
    code, out, err = _main(capsys, "encode", str(tmp_path / "mlp.safetensors"), str(tmp_path / "ann.hdf5"),
                           "--key", "test", "--out", str(tmp_path / "h.npy"))
    assert code == 0, err
    np.testing.assert_array_equal(np.load(tmp_path / "h.npy"), latentspace.encode(mlp, images[40:45]))


def test_pipeline_progress_bar_only_on_a_terminal(pipeline_files, capsys, monkeypatch):
    tmp, _, _, _ = pipeline_files
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, out, err = _main(capsys, "encode", str(tmp / "model.safetensors"), str(tmp / "x.npy"),
                           "--out", str(tmp / "z.npy"), "--batch-size", "64")
    assert code == 0, err
    assert "encode" in err and "300/300" in err  # tqdm's bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, out, err = _main(capsys, "index", "build", str(tmp / "z.npy"), "--out", str(tmp / "i.lsidx"), "--quiet")
    assert code == 0 and err == ""


def _pipeline_error(capsys, command: str, *args: str) -> str:
    code, out, err = _main(capsys, *args)
    assert code == 2, (out, err)
    assert err.startswith(f"latentspace {command}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_pipeline_errors(pipeline_files, capsys):
    import numpy as np

    tmp, model, x, _ = pipeline_files
    m, data = str(tmp / "model.safetensors"), str(tmp / "x.npy")
    before = _files(tmp)
    err = _pipeline_error(capsys, "encode", "encode", m, str(tmp / "nope.npy"), "--out", str(tmp / "z.npy"))
    assert "No such file" in err
    err = _pipeline_error(capsys, "encode", "encode", str(tmp / "nope.safetensors"), data, "--out", str(tmp / "z.npy"))
    assert "No such file" in err
    err = _pipeline_error(capsys, "encode", "encode", data, data, "--out", str(tmp / "z.npy"))
    assert "not a latentspace model file" in err
    err = _pipeline_error(capsys, "encode", "encode", m, data, "--out", str(tmp / "z.txt"))
    assert "--out: expected a file name ending in .npy" in err
    err = _pipeline_error(capsys, "encode", "encode", m, data, "--out", str(tmp / "z.npy"), "--batch-size", "0")
    assert "--batch-size: expected an integer >= 1" in err
    err = _pipeline_error(capsys, "encode", "encode", m, data, "--out", str(tmp / "z.npy"), "--device", "tpu")
    assert "--device: expected 'cpu', 'cuda' or 'cuda:N'" in err
    np.save(tmp / "wide.npy", np.zeros((5, 65), dtype=np.float32))
    err = _pipeline_error(capsys, "encode", "encode", m, str(tmp / "wide.npy"), "--out", str(tmp / "z.npy"))
    assert f"{tmp / 'wide.npy'}: expected shape (n, 64), got (5, 65)" in err
    bad = x.copy()
    bad[9, 5] = np.nan
    np.save(tmp / "bad.npy", bad)
    err = _pipeline_error(capsys, "encode", "encode", m, str(tmp / "bad.npy"), "--out", str(tmp / "z.npy"),
                          "--batch-size", "4")
    assert f"{tmp / 'bad.npy'}: row 9 contains NaN or Inf" in err  # the file's row, not the chunk's
    assert not (tmp / "z.npy").exists()

    np.save(tmp / "codes.npy", latentspace.encode(model, x))
    err = _pipeline_error(capsys, "index build", "index", "build", str(tmp / "bad.npy"), "--out", str(tmp / "i.lsidx"),
                          "--batch-size", "4")
    assert f"{tmp / 'bad.npy'}: row 9 contains NaN or Inf" in err
    np.save(tmp / "flat.npy", np.zeros(5, dtype=np.float32))
    err = _pipeline_error(capsys, "index build", "index", "build", str(tmp / "flat.npy"), "--out", str(tmp / "i.lsidx"))
    assert "expected a 2-d array of vectors (n, dim), got shape (5,)" in err
    assert not (tmp / "i.lsidx").exists()

    code, _, err = _main(capsys, "index", "build", str(tmp / "codes.npy"), "--out", str(tmp / "c.lsidx"))
    assert code == 0, err
    idx = str(tmp / "c.lsidx")
    err = _pipeline_error(capsys, "search", "search", idx, data, "--out", str(tmp / "r.npz"))
    assert "expected queries of shape (n, 4) (the index's dim), got (300, 64); pass --model MODEL" in err
    latentspace.save_model(latentspace.Autoencoder(64, 6, hidden=(8,)), tmp / "six.safetensors")
    err = _pipeline_error(capsys, "search", "search", idx, data, "--model", str(tmp / "six.safetensors"),
                          "--out", str(tmp / "r.npz"))
    assert "--model: its codes have 6 dimensions but" in err and "holds 4-dimensional vectors" in err
    err = _pipeline_error(capsys, "search", "search", idx, str(tmp / "bad.npy"), "--model", m,
                          "--out", str(tmp / "r.npz"))
    assert f"{tmp / 'bad.npy'}: row 9 contains NaN or Inf" in err
    err = _pipeline_error(capsys, "search", "search", idx, str(tmp / "codes.npy"), "-k", "0",
                          "--out", str(tmp / "r.npz"))
    assert "-k: expected an integer >= 1" in err
    for k in (2**62, 2**50, 99999999999999):  # could never be allocated: -k's doing, exit 2 (was 1 below 2**63)
        err = _pipeline_error(capsys, "search", "search", idx, str(tmp / "codes.npy"), "-k", str(k),
                              "--out", str(tmp / "r.npz"))
        assert f"-k: 300 queries x {k:,} neighbours need" in err and "memory" in err and err.rstrip().endswith("; lower -k"), err
    for option in (["--device", "cuda"], ["--device", "bogus"], ["--precision", "bf16"]):
        err = _pipeline_error(capsys, "search", "search", idx, str(tmp / "codes.npy"), *option,
                              "--out", str(tmp / "r.npz"))
        assert "--device, --precision: they choose how --model encodes the queries" in err
    err = _pipeline_error(capsys, "search", "search", data, str(tmp / "codes.npy"), "--out", str(tmp / "r.npz"))
    assert "not a latentspace index file" in err
    err = _pipeline_error(capsys, "search", "search", idx, str(tmp / "codes.npy"), "--out", str(tmp / "r.npy"))
    assert "--out: expected a file name ending in .npz" in err
    assert set(_files(tmp)) - set(before) == {"bad.npy", "c.lsidx", "codes.npy", "flat.npy", "six.safetensors",
                                              "wide.npy"}  # no outputs, no temporary files


def test_weighted_index_from_the_shell(tmp_path, rng, capsys):
    """index build --metric weighted_l2 --weights stores the default; search --weights
    overrides it per search; both equal the Python API's answers."""
    import numpy as np

    Z = rng.standard_normal((300, 4)).astype(np.float32)
    Q = rng.standard_normal((6, 4)).astype(np.float32)
    w_build, w_search = np.array([1, 0, 2, 1], np.float32), np.array([0, 1, 1, 3], np.float32)
    for name, array in (("Z.npy", Z), ("Q.npy", Q), ("wb.npy", w_build), ("ws.npy", w_search)):
        np.save(tmp_path / name, array)
    code, _, err = _main(capsys, "index", "build", str(tmp_path / "Z.npy"), "--out", str(tmp_path / "i.lsidx"),
                         "--metric", "weighted_l2", "--weights", str(tmp_path / "wb.npy"))
    assert code == 0, err
    for weights, extra in ((w_build, []), (w_search, ["--weights", str(tmp_path / "ws.npy")])):
        code, _, err = _main(capsys, "search", str(tmp_path / "i.lsidx"), str(tmp_path / "Q.npy"), "-k", "5",
                             "--out", str(tmp_path / "r.npz"), *extra)
        assert code == 0, err
        result = np.load(tmp_path / "r.npz")
        D, I = latentspace.knn(Q, Z, 5, "weighted_l2", weights=weights)
        np.testing.assert_array_equal(result["indices"], I)
        np.testing.assert_array_equal(result["distances"], D)


def test_weights_for_an_unweighted_index_are_refused(tmp_path, rng, capsys):
    import numpy as np

    np.save(tmp_path / "Z.npy", rng.standard_normal((10, 3)).astype(np.float32))
    np.save(tmp_path / "w.npy", np.ones(3, np.float32))
    code, _, err = _main(capsys, "index", "build", str(tmp_path / "Z.npy"), "--out", str(tmp_path / "i.lsidx"),
                         "--weights", str(tmp_path / "w.npy"))
    assert code == 2
    assert "--weights: only the weighted_l2 metric takes weights" in err


# ---------------------------------------------------------------------------------------
# latentspace plot (in-process, like the pipeline's tests; one subprocess run)


def _png_size(path) -> tuple[int, int]:
    import struct

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG file"
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def plot_files(tmp_path):
    """A PCA of the digits and a small VAE, saved; 200 digits in an .npz (x, y), as .npy too."""
    import numpy as np
    import torch

    pytest.importorskip("matplotlib")
    images, labels = latentspace.datasets.load_digits()
    latentspace.save_model(latentspace.PCA(6).fit(images), tmp_path / "pca.safetensors")
    torch.manual_seed(0)
    latentspace.save_model(latentspace.VAE(64, 3, hidden=(16,)), tmp_path / "vae.safetensors")
    np.savez(tmp_path / "d.npz", x=images[:200], y=labels[:200])
    np.save(tmp_path / "x.npy", images[:200])
    np.save(tmp_path / "y.npy", labels[:200])
    return tmp_path


def test_plot_every_kind_on_the_digits(plot_files, capsys):
    tmp = plot_files
    model = str(tmp / "pca.safetensors")
    cases = {"map": (["--method", "pca"], (700, 600)), "reconstructions": ([], (1100, 270)),
             "interpolation": ([], (1320, 170)), "neighbors": ([], (990, 460)), "relevance": ([], (400, 350))}
    for kind, (options, size) in cases.items():
        path = tmp / f"{kind}.png"
        code, out, err = _main(capsys, "plot", kind, model, "digits", "--out", str(path), *options)
        assert code == 0, err
        assert out.startswith(f"latentspace plot {kind}: {path} (") and err == ""
        assert _png_size(path) == size
        if kind == "map":
            assert "1,797 codes of the scikit-learn digits, PCA" in out
        if kind == "relevance":  # the digits come with labels: Fisher scores by default
            assert "fisher scores of 6 latent dimensions" in out


def test_plot_files_labels_and_options(plot_files, capsys):
    tmp = plot_files
    pca, vae = str(tmp / "pca.safetensors"), str(tmp / "vae.safetensors")
    # labels from the data's own .npz, or from a separate file
    code, out, err = _main(capsys, "plot", "map", pca, str(tmp / "d.npz"), "--key", "x", "--labels-key", "y",
                           "--method", "pca", "--out", str(tmp / "m1.png"))
    assert code == 0, err
    assert "200 codes of" in out and "no labels" not in out
    code, out, err = _main(capsys, "plot", "map", pca, str(tmp / "x.npy"), "--labels", str(tmp / "y.npy"),
                           "--method", "pca", "--out", str(tmp / "m2.png"))
    assert code == 0, err
    assert (tmp / "m1.png").read_bytes() == (tmp / "m2.png").read_bytes()
    code, out, err = _main(capsys, "plot", "map", pca, str(tmp / "x.npy"), "--method", "pca", "--limit", "50",
                           "--out", str(tmp / "m3.png"))
    assert code == 0 and "50 codes of" in out and ", no labels: one colour" in out, err
    # a VAE's active units; mutual information; options of the image kinds
    code, out, err = _main(capsys, "plot", "relevance", vae, str(tmp / "x.npy"), "--method", "kl",
                           "--out", str(tmp / "kl.png"))
    assert code == 0 and "kl scores of 3 latent dimensions" in out, err
    code, out, err = _main(capsys, "plot", "relevance", pca, "digits", "--method", "mutual_info",
                           "--limit", "300", "--out", str(tmp / "mi.png"))
    assert code == 0 and "mutual_info scores of 6 latent dimensions" in out, err
    code, out, err = _main(capsys, "plot", "relevance", pca, str(tmp / "x.npy"), "--out", str(tmp / "var.png"))
    assert code == 0 and "variance scores" in out, err  # no labels: variance
    code, out, err = _main(capsys, "plot", "reconstructions", vae, str(tmp / "x.npy"), "-n", "4",
                           "--out", str(tmp / "r.png"))
    assert code == 0 and _png_size(tmp / "r.png") == (440, 270), err
    code, out, err = _main(capsys, "plot", "interpolation", vae, "digits", "--pair", "5,17", "--steps", "3",
                           "--out", str(tmp / "i.png"))
    assert code == 0 and "3 steps from row 5 to row 17" in out, err
    code, out, err = _main(capsys, "plot", "neighbors", vae, str(tmp / "d.npz"), "--key", "x", "--labels-key", "y",
                           "--queries", "7", "-k", "3", "--image-shape", "8,8", "--out", str(tmp / "n.png"))
    assert code == 0 and "the 3 nearest neighbours of 1 rows" in out, err
    assert _png_size(tmp / "n.png") == (440, 180)


def test_plot_errors(plot_files, capsys):
    import numpy as np

    tmp = plot_files
    pca, x = str(tmp / "pca.safetensors"), str(tmp / "x.npy")
    before = _files(tmp)
    out = ["--out", str(tmp / "m.png")]
    err = _pipeline_error(capsys, "plot", "plot", "map", pca, x, "--out", str(tmp / "m.jpg"))
    assert "--out: expected a file name ending in .png" in err
    err = _pipeline_error(capsys, "plot", "plot", "map", str(tmp / "nope.safetensors"), x, *out)
    assert "No such file" in err
    err = _pipeline_error(capsys, "plot", "plot", "relevance", pca, x, "--method", "fisher", *out)
    assert "--labels: method 'fisher' needs class labels; pass --labels FILE" in err
    err = _pipeline_error(capsys, "plot", "plot", "relevance", pca, x, "--method", "anova", *out)
    assert "--method: expected one of 'fisher', 'mutual_info', 'variance', 'kl'" in err
    err = _pipeline_error(capsys, "plot", "plot", "relevance", pca, x, "--method", "kl", *out)
    assert f"error: {pca}: --method 'kl' needs a VAE" in err and "got PCA" in err  # the MODEL file, not the API's model
    err = _pipeline_error(capsys, "plot", "plot", "map", pca, x, "--method", "tsne", *out)
    assert "--method: expected 'auto', 'pca' or 'umap'" in err
    np.save(tmp / "short.npy", np.arange(10))
    err = _pipeline_error(capsys, "plot", "plot", "map", pca, x, "--labels", str(tmp / "short.npy"), *out)
    assert "--labels: expected 200 labels (one per row of" in err
    err = _pipeline_error(capsys, "plot", "plot", "map", pca, "digits", "--labels-key", "y", *out)
    assert "--labels-key: the digits come with their labels" in err
    err = _pipeline_error(capsys, "plot", "plot", "interpolation", pca, x, "--pair", "0", *out)
    assert "--pair: expected 2 comma-separated row numbers such as 0,1, got '0'" in err
    err = _pipeline_error(capsys, "plot", "plot", "interpolation", pca, x, "--pair", "0,200", *out)
    assert "--pair: row 200 is out of range for the data's 200 rows" in err
    err = _pipeline_error(capsys, "plot", "plot", "neighbors", pca, x, "--queries", "a", *out)
    assert "--queries: expected comma-separated row numbers" in err
    err = _pipeline_error(capsys, "plot", "plot", "neighbors", pca, x, "--queries", "3,200", *out)
    assert "--queries: row 200 is out of range for the data's 200 rows" in err  # not "X's 200 samples"
    err = _pipeline_error(capsys, "plot", "plot", "neighbors", pca, x, "-k", "0", *out)
    assert "-k: expected an integer >= 1" in err
    np.save(tmp / "wide.npy", np.zeros((5, 65), dtype=np.float32))
    err = _pipeline_error(capsys, "plot", "plot", "map", pca, str(tmp / "wide.npy"), *out)
    assert f"{tmp / 'wide.npy'}: expected samples of the model's input shape (64,)" in err
    err = _pipeline_error(capsys, "plot", "plot", "reconstructions", pca, x, "--image-shape", "4,4", *out)
    assert "--image-shape: (4, 4) holds 16 values, but each sample has 64" in err
    assert set(_files(tmp)) - set(before) == {"short.npy", "wide.npy"}  # no pictures, no temporary files


def test_plot_as_a_subprocess(plot_files):
    tmp = plot_files
    result = _cli("plot", "relevance", str(tmp / "pca.safetensors"), "digits", "--out", str(tmp / "r.png"),
                  "--threads", "1")
    assert result.returncode == 0, result.stderr
    assert "fisher scores of 6 latent dimensions on the scikit-learn digits (best: z" in result.stdout
    assert _png_size(tmp / "r.png") == (400, 350)
    result = _cli("plot", "map", str(tmp / "pca.safetensors"), str(tmp / "missing.npy"), "--out", str(tmp / "m.png"))
    assert result.returncode == 2 and result.stderr.startswith("latentspace plot: error: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr


def test_train_with_a_metric_loss(tmp_path, capsys):
    """--metric-loss shapes the latent space with the labels (the digits' own here); the
    history records the metric term."""
    code, out, err = _main(capsys, "train", "digits", "--model", "autoencoder", "--epochs", "2", "--metric-loss",
                           "supcon", "--metric-weight", "2", "--out", str(tmp_path), "--no-progress")
    assert code == 0, err
    history = json.loads((tmp_path / "history.json").read_text())
    assert history["metric_loss"] == "supcon" and history["metric_weight"] == 2.0
    assert len(history["train_metric"]) == 2 and all(v > 0 for v in history["train_metric"])


def test_train_metric_loss_errors(tmp_path, capsys):
    import numpy as np

    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((40, 6)).astype(np.float32))
    np.save(tmp_path / "y.npy", np.arange(39) % 3)
    cases = [
        (["train", str(tmp_path / "x.npy"), "--model", "autoencoder", "--metric-loss", "supcon"],
         "--metric-loss: needs --labels"),
        (["train", str(tmp_path / "x.npy"), "--model", "autoencoder", "--metric-loss", "supcon",
          "--labels", str(tmp_path / "y.npy")], "--labels: expected 40 labels"),
        (["train", "digits", "--model", "pca", "--metric-loss", "triplet"], "--metric-loss: PCA is fitted"),
        (["train", "digits", "--labels", str(tmp_path / "y.npy")], "--labels: only used with --metric-loss"),
    ]
    for args, message in cases:
        code, _, err = _main(capsys, *args, "--out", str(tmp_path / "run"), "--epochs", "1", "--no-progress")
        assert code == 2 and message in err, err


def test_train_labels_from_an_npz(tmp_path, capsys):
    """--labels reads .npz as the data does (it raised AttributeError: 'NpzFile' object has
    no attribute 'shape'); --labels-key picks the array of an archive holding several."""
    import numpy as np

    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((40, 6)).astype(np.float32))
    np.savez(tmp_path / "one.npz", y=np.arange(40) % 3)
    np.savez(tmp_path / "two.npz", y=np.arange(40) % 3, other=np.zeros(7))
    train = ["train", str(tmp_path / "x.npy"), "--model", "autoencoder", "--metric-loss", "supcon",
             "--epochs", "1", "--no-progress", "--out", str(tmp_path / "run")]
    for labels in (["--labels", str(tmp_path / "one.npz")],
                   ["--labels", str(tmp_path / "two.npz"), "--labels-key", "y"]):
        code, _, err = _main(capsys, *train, *labels)
        assert code == 0, err
        assert json.loads((tmp_path / "run" / "history.json").read_text())["metric_loss"] == "supcon"
    for labels, message in (
        (["--labels", str(tmp_path / "two.npz")],
         f"--labels-key: {tmp_path / 'two.npz'} holds 2 arrays (y, other); pass --labels-key to pick one"),
        (["--labels", str(tmp_path / "two.npz"), "--labels-key", "other"], "--labels: expected 40 labels"),
        (["--labels", str(tmp_path / "two.npz"), "--labels-key", "z"], "has no array 'z'"),
        (["--labels-key", "y"], "--labels-key: picks the array in the --labels .npz; pass --labels FILE too"),
    ):
        code, _, err = _main(capsys, *train, *labels)
        assert code == 2 and err.startswith("latentspace train: error: ") and err.count("\n") == 1, err
        assert message in err, err


def test_damaged_npz_inputs_are_one_line_errors(tmp_path, capsys):
    """A damaged archive (here its first member's compression method) printed zipfile's
    traceback, exit 1."""
    import numpy as np

    def damaged(name, **arrays):
        np.savez(tmp_path / name, **arrays)
        raw = bytearray((tmp_path / name).read_bytes())
        raw[raw.index(b"PK\x01\x02") + 10] ^= 0xFF  # the central directory's compression method
        (tmp_path / name).write_bytes(bytes(raw))
        return str(tmp_path / name)

    data = damaged("s.npz", a=np.ones((10, 3), np.float32), b=np.ones((10, 3)))
    weights = damaged("w.npz", w=np.ones(3, np.float32))
    np.save(tmp_path / "z.npy", np.ones((10, 3), np.float32))
    for command, args, bad in (
        ("index build", ["index", "build", data, "--key", "a", "--out", str(tmp_path / "i.lsidx")], data),
        ("index build", ["index", "build", str(tmp_path / "z.npy"), "--metric", "weighted_l2",
                         "--weights", weights, "--out", str(tmp_path / "i.lsidx")], weights),
        ("train", ["train", data, "--key", "a", "--model", "pca", "--latent-dim", "2",
                   "--out", str(tmp_path / "run")], data),
    ):
        err = _pipeline_error(capsys, command, *args)
        assert f"{bad}: not a readable .npz file (NotImplementedError: " in err, err


# ---------------------------------------------------------------------------------------
# Errors name what the user typed: flags, not the Python API's parameters; the data file,
# not an internal array


def test_renamed_maps_a_leading_parameter_and_its_keyword():
    from latentspace.cli_pipeline import renamed

    names = {"key": "--key", "k": "-k", "X": "data.npy"}
    assert renamed("key: a.npz holds 2 arrays (a, b); pass key= to pick one", names) == \
        "--key: a.npz holds 2 arrays (a, b); pass --key to pick one"
    assert renamed("k: 3 queries x k=5 results", names) == "-k: 3 queries x -k 5 results"
    assert renamed("X: row 3 contains NaN", names) == "data.npy: row 3 contains NaN"
    assert renamed("latent_dim: PCA(latent_dim=5) is too large", {"latent_dim": "--latent-dim"}) == \
        "--latent-dim: PCA(latent_dim=5) is too large"  # only a keyword after a space is renamed
    for untouched in ("x.npy: pass key= to pick one", "no parameter here", "--key: already a flag"):
        assert renamed(untouched, names) == untouched
    # another flag's keyword in the message is renamed too
    assert renamed("labels: the rows left after val_fraction=0.5 hold one class",
                   {"labels": "--labels", "val_fraction": "--val-fraction"}) == \
        "--labels: the rows left after --val-fraction 0.5 hold one class"


def test_train_labels_left_unusable_by_the_split_are_named_with_flags(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.random((20, 6)).astype(np.float32))
    np.save(tmp_path / "y.npy", np.repeat(np.arange(10), 2))  # two rows a class: one left to train on
    code, _, err = _main(capsys, "train", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                         "--metric-loss", "supcon", "--val-fraction", "0.5", "--epochs", "1", "--hidden", "4",
                         "--latent-dim", "2", "--out", str(tmp_path / "run"), "--no-progress")
    assert code == 2 and "--labels: the training rows left after holding out --val-fraction 0.5 have every " \
        "class a single sample" in err, err


def test_plot_names_the_data_file_for_a_nan_row(plot_files, capsys):
    """A NaN row of the data file was refused as a row of knn's `database` or of the codes
    `Z`, names the user never typed."""
    import numpy as np

    tmp = plot_files
    x = np.load(tmp / "x.npy").astype(np.float32)
    x[5, 3] = np.nan
    np.save(tmp / "xnan.npy", x)
    bad = str(tmp / "xnan.npy")
    for kind in ("neighbors", "map", "relevance"):
        err = _pipeline_error(capsys, "plot", "plot", kind, str(tmp / "pca.safetensors"), bad,
                              "--out", str(tmp / "p.png"))
        assert f"error: {bad}: row 5 contains NaN or Inf" in err, err
    assert not (tmp / "p.png").exists()


@pytest.mark.parametrize("case", ["encode --key", "encode --out", "encode --device", "index build --weights",
                                  "search -k", "search --key", "plot -n", "plot --steps", "plot -k",
                                  "plot --out", "plot --method", "plot --image-shape", "plot --image-shape abc",
                                  "plot --labels-key", "train --key", "train --epochs"])
def test_errors_name_the_flag_typed(pipeline_files, capsys, case):
    """Each said the Python parameter instead (key:, path:, weights:, k:, n:, ...), or for a
    bad --image-shape, that it expected row numbers."""
    import numpy as np

    tmp, model, x, _ = pipeline_files
    m, data = str(tmp / "model.safetensors"), str(tmp / "x.npy")
    np.savez(tmp / "two.npz", a=x, b=x)
    np.save(tmp / "codes.npy", latentspace.encode(model, x))
    np.save(tmp / "w3.npy", np.ones(3, np.float32))
    latentspace.FlatIndex(4).save(tmp / "i.lsidx")
    argv, message = {
        "encode --key": (["encode", m, str(tmp / "two.npz"), "--out", str(tmp / "z.npy")],
                         "--key: " + str(tmp / "two.npz") + " holds 2 arrays (a, b); pass --key to pick one"),
        "encode --out": (["encode", m, data, "--out", str(tmp / "nodir" / "z.npy")],
                         f"--out: cannot write {tmp / 'nodir' / 'z.npy'}: folder {tmp / 'nodir'} does not exist"),
        "encode --device": (["encode", m, data, "--out", str(tmp / "z.npy"), "--device", "foo"],
                            "--device: expected 'cpu', 'cuda' or 'cuda:N', got 'foo'"),
        "index build --weights": (["index", "build", str(tmp / "codes.npy"), "--metric", "weighted_l2",
                                   "--weights", str(tmp / "w3.npy"), "--out", str(tmp / "j.lsidx")],
                                  "--weights: expected 4 values (one per dimension)"),
        "search -k": (["search", str(tmp / "i.lsidx"), str(tmp / "codes.npy"), "-k", "0", "--out", str(tmp / "r.npz")],
                      "-k: expected an integer >= 1, got 0"),
        "search --key": (["search", str(tmp / "i.lsidx"), str(tmp / "two.npz"), "--out", str(tmp / "r.npz")],
                         "pass --key to pick one"),
        "plot -n": (["plot", "reconstructions", m, data, "-n", "0"], "-n: expected an integer >= 1, got 0"),
        "plot --steps": (["plot", "interpolation", m, data, "--steps", "1"], "--steps: expected an integer >= 2"),
        "plot -k": (["plot", "neighbors", m, data, "-k", "0"], "-k: expected an integer >= 1, got 0"),
        "plot --out": (["plot", "map", m, data, "--out", str(tmp / "m.jpg")],
                       "--out: expected a file name ending in .png"),
        "plot --method": (["plot", "map", m, data, "--method", "tsne"], "--method: expected 'auto', 'pca' or 'umap'"),
        "plot --image-shape": (["plot", "reconstructions", m, data, "--image-shape", "4,4"],
                               "--image-shape: (4, 4) holds 16 values, but each sample has 64"),
        "plot --image-shape abc": (["plot", "reconstructions", m, data, "--image-shape", "abc"],
                                   "--image-shape: expected H,W or C,H,W (sizes >= 1) such as 28,28 or 1,28,28, "
                                   "got 'abc'"),
        "plot --labels-key": (["plot", "map", m, data, "--labels", str(tmp / "two.npz")],
                              "--labels-key: " + str(tmp / "two.npz") + " holds 2 arrays (a, b); "
                              "pass --labels-key to pick one"),
        "train --key": (["train", str(tmp / "two.npz"), "--model", "pca", "--out", str(tmp / "run")],
                        "--key: " + str(tmp / "two.npz") + " holds 2 arrays"),
        "train --epochs": (["train", data, "--model", "autoencoder", "--epochs", "0", "--out", str(tmp / "run")],
                           "--epochs: expected an integer >= 1, got 0"),
    }[case]
    if argv[0] == "plot" and "--out" not in argv:
        argv += ["--out", str(tmp / "p.png")]
    command = "index build" if argv[0] == "index" else argv[0]
    flag = next(word for word in case.split()[1:] if word.startswith("-"))
    err = _pipeline_error(capsys, command, *argv)
    assert f"error: {flag}: " in err and message in err, err


def test_an_output_never_replaces_an_input(pipeline_files, capsys):
    """`index build Z.npy --out Z.npy` replaced the vectors with their index (and encode /
    search could overwrite their data the same way): index files must be .lsidx, and no
    --out may be one of the command's inputs."""
    import numpy as np

    tmp, model, x, q = pipeline_files
    m, data = str(tmp / "model.safetensors"), str(tmp / "x.npy")
    np.save(tmp / "z.npy", latentspace.encode(model, x))
    z_bytes, x_bytes = (tmp / "z.npy").read_bytes(), (tmp / "x.npy").read_bytes()
    for out in ("z.npy", "i", "i.idx"):
        err = _pipeline_error(capsys, "index build", "index", "build", str(tmp / "z.npy"), "--out", str(tmp / out))
        assert f"--out: expected a file name ending in .lsidx, got '{tmp / out}'" in err
    err = _pipeline_error(capsys, "encode", "encode", m, data, "--out", data)
    assert f"--out: {data} would replace the input {data}" in err
    code, _, err = _main(capsys, "index", "build", str(tmp / "z.npy"), "--out", str(tmp / "i.lsidx"))
    assert code == 0, err
    np.savez(tmp / "q.npz", q=latentspace.encode(model, q))
    q_bytes = (tmp / "q.npz").read_bytes()
    err = _pipeline_error(capsys, "search", "search", str(tmp / "i.lsidx"), str(tmp / "q.npz"),
                          "--out", str(tmp / "q.npz"))
    assert "would replace the input" in err
    assert (tmp / "z.npy").read_bytes() == z_bytes and (tmp / "x.npy").read_bytes() == x_bytes
    assert (tmp / "q.npz").read_bytes() == q_bytes


# ---------------------------------------------------------------------------------------
# Review: flags refused late, or in the Python API's words


@pytest.mark.parametrize("command", [["demo"], ["train", "digits"]])
@pytest.mark.parametrize("seed", ["-1", str(2**63), str(2**64)])
def test_seed_is_checked_as_it_is_parsed(command, seed, capsys):
    """--seed -1 said 'seed: ...' after PCA was fitted, and --seed 2**64 'Overflow when
    unpacking long long' (torch.manual_seed's), naming nothing. Training takes [0, 2**63)."""
    from latentspace.cli import build_parser

    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args([*command, "--seed", seed])
    assert caught.value.code == 2
    expected = ">= 0" if seed == "-1" else f"<= {2**63 - 1}"
    assert f"error: argument --seed: expected an integer {expected}, got '{seed}'" in capsys.readouterr().err


def test_threads_past_the_native_limit_are_refused_by_name(capsys):
    """--threads 2**31 passed parsing and was refused by set_num_threads as its own `n`."""
    from latentspace.cli import build_parser

    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["demo", "--threads", str(2**31)])
    assert caught.value.code == 2
    assert f"error: argument --threads: expected an integer <= {2**31 - 1}, got '{2**31}'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["demo"], ["train", "digits"], ["encode", "m.st", "x.npy"]])
def test_threads_past_what_torch_can_start_are_refused_by_name(command, capsys):
    """--threads 100000 reached torch.set_num_threads: its OpenMP pool could not start the
    threads ("libgomp: Thread creation failed") and `latentspace train` segfaulted (exit 139),
    `encode` after writing its output. Now at most 64 a processor (and at least 256)."""
    from latentspace.cli import build_parser
    from latentspace.cli_pipeline import most_threads, thread_count

    most = most_threads()
    assert most >= 256 and most % 64 == 0
    assert thread_count(str(most)) == most  # (what every --threads parses with)
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args([*command, "--threads", "100000" if most < 100000 else str(most + 1)])
    assert caught.value.code == 2
    assert f"error: argument --threads: expected at most {most:,} threads (64 a processor" in capsys.readouterr().err


@pytest.mark.parametrize("option,value,message", [
    ("-k", "539", "-k: 539 neighbours need at least 540 held-out digits, there are 539"),
    ("--examples", "1798", "--examples: 1798 digits to show, but there are 1797"),
])
def test_demo_counts_past_the_digits_are_refused_before_training(tmp_path, capsys, option, value, message):
    """-k past the held-out digits said 'Z: k=539 neighbours per point need...'; --examples
    past the digits failed after every model was trained, with numpy's 'Cannot take a
    larger sample than population when replace is False'."""
    code, out, err = _main(capsys, "demo", "--models", "autoencoder", "--epochs", "1", "--no-metric-learning",
                           "--out", str(tmp_path / "d"), option, value)
    assert code == 2 and err == f"latentspace demo: error: {message}\n", err
    assert "epochs in" not in out  # nothing was trained
    assert not (tmp_path / "d").exists()


def test_demo_out_that_cannot_be_a_folder_is_refused_before_training(tmp_path, capsys):
    """--out under a file failed only when the pictures were written, after the training,
    with '[Errno 20] Not a directory' naming no flag."""
    (tmp_path / "file").write_text("x")
    code, out, err = _main(capsys, "demo", "--models", "autoencoder", "--epochs", "1", "--no-metric-learning",
                           "--out", str(tmp_path / "file" / "pictures"))
    assert code == 2 and err.startswith("latentspace demo: error: --out: "), err
    assert "epochs in" not in out


def test_train_out_that_cannot_be_a_folder_names_out(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "run"):
        code, _, err = _main(capsys, "train", "digits", "--model", "pca", "--out", str(out))
        assert code == 2 and err.startswith(f"latentspace train: error: --out: {out}"), err


def test_a_failed_train_removes_the_folders_it_made_and_keeps_the_users(tmp_path, capsys, monkeypatch):
    # the folder was made before PCA (or training) checked the data: a failed run left it empty
    deep = tmp_path / "new" / "run"
    code, _, err = _main(capsys, "train", "digits", "--model", "pca", "--latent-dim", "100", "--out", str(deep))
    assert code == 2 and "--latent-dim: PCA(latent_dim=100) cannot exceed" in err
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    code, _, _ = _main(capsys, "train", "digits", "--model", "pca", "--latent-dim", "100", "--out", str(mine))
    assert code == 2 and mine.is_dir()  # the user's own folder stays
    from latentspace import training

    real_train = training.train  # Ctrl-C before the first epoch ends: nothing saved
    monkeypatch.setattr(training, "train", lambda *a, **k: _interrupt_first_batch(real_train, *a, **k))
    code, _, err = _main(capsys, "train", "digits", "--model", "autoencoder", "--hidden", "8", "--out", str(deep),
                         "--no-progress")
    assert code == 130 and "nothing saved" in err
    assert not (tmp_path / "new").exists()
    code, _, _ = _main(capsys, "train", "digits", "--model", "pca", "--latent-dim", "4", "--out", str(deep))
    assert code == 0 and sorted(p.name for p in deep.iterdir()) == ["history.json", "model.safetensors"]


def _interrupt_first_batch(real_train, model, X, **kwargs):
    """train with a KeyboardInterrupt from the model's first training batch."""
    def objective(*args, **objective_kwargs):
        raise KeyboardInterrupt

    model.objective = objective
    return real_train(model, X, **kwargs)


@pytest.mark.parametrize("shape", [(0, 16), (5, 0)])
@pytest.mark.parametrize("model", ["pca", "autoencoder"])
def test_train_on_no_data_names_the_file(tmp_path, capsys, shape, model):
    """No rows, or rows of no values: numpy's 'zero-size array to reduction operation minimum
    which has no identity' or 'cannot reshape array of size 0'."""
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros(shape, np.float32))
    code, _, err = _main(capsys, "train", str(tmp_path / "x.npy"), "--model", model, "--latent-dim", "2",
                         "--out", str(tmp_path / "run"))
    assert code == 2, err
    assert err == f"latentspace train: error: {tmp_path / 'x.npy'}: no data to train on, shape {shape}\n", err


def test_train_names_the_data_file_for_a_nan_row(tmp_path, capsys):
    """'X: row 3 contains NaN or Inf', naming the Python API's parameter."""
    import numpy as np

    x = np.random.default_rng(0).random((40, 8)).astype(np.float32)
    x[3, 2] = np.nan
    np.save(tmp_path / "x.npy", x)
    for model in ("pca", "autoencoder"):
        code, _, err = _main(capsys, "train", str(tmp_path / "x.npy"), "--model", model, "--latent-dim", "2",
                             "--out", str(tmp_path / "run"))
        assert code == 2 and err.startswith(f"latentspace train: error: {tmp_path / 'x.npy'}: row 3 contains NaN"), err


@pytest.mark.parametrize("options,message", [
    (["--hidden", "32,0"], "--hidden: item 2: expected an integer >= 1"),
    (["--hidden", "8,,3"], "--hidden: item 2 is empty in '8,,3'; expected comma-separated integers"),
    (["--hidden", "8,3,"], "--hidden: item 3 is empty in '8,3,'"),
    (["--model", "conv", "--image-shape", "0,8,8"], "--image-shape: item 1: expected an integer >= 1"),
    (["--model", "conv", "--image-shape", "1,8"], "--image-shape: expected (C, H, W)"),
])
def test_an_item_of_a_list_flag_is_named_by_the_flag(tmp_path, capsys, options, message):
    """--hidden 32,0 said 'hidden[1]: expected an integer >= 1', --image-shape 0,8,8
    'input_shape[0]: ...' and --image-shape 1,8 'input_shape: ...'."""
    code, _, err = _main(capsys, "train", "digits", *options, "--out", str(tmp_path / "run"))
    assert code == 2 and err.startswith(f"latentspace train: error: {message}"), err



def test_weights_in_an_archive_of_several_arrays(tmp_path, rng, capsys):
    """--weights W.npz of two arrays said 'pass key= to pick one': no flag picks one."""
    import numpy as np

    np.save(tmp_path / "z.npy", rng.random((20, 4)).astype(np.float32))
    np.savez(tmp_path / "w.npz", a=np.ones(4, np.float32), b=np.ones(4, np.float32))
    err = _pipeline_error(capsys, "index build", "index", "build", str(tmp_path / "z.npy"), "--metric", "weighted_l2",
                          "--weights", str(tmp_path / "w.npz"), "--out", str(tmp_path / "i.lsidx"))
    assert err == (f"latentspace index build: error: --weights: {tmp_path / 'w.npz'} holds 2 arrays (a, b); "
                   "pass a .npy, or an .npz of one array\n"), err


def test_a_closed_stdout_ends_the_command_quietly():
    """`latentspace demo | head -2`: the reader's exit made the next print fail, reported as
    'error: [Errno 32] Broken pipe' with the usage errors' exit status 2. Now it stops
    quietly, with the status of a tool killed by SIGPIPE (128 + 13), as `head` expects."""
    process = subprocess.Popen([sys.executable, "-m", "latentspace", "info"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)
    process.stdout.close()  # before the command prints
    err = process.stderr.read().decode()
    assert process.wait(timeout=180) == 141 and err == "", err


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX shell")
def test_no_stdout_at_all_is_not_an_error():
    """Started with file descriptor 1 closed (`latentspace info >&-`, some daemons), Python
    sets sys.stdout to None and print() does nothing: the command ran, then main()'s flush
    for a closed pipe raised AttributeError ('NoneType' object has no attribute 'flush') as
    a traceback, exit status 1."""
    result = subprocess.run(f"exec 1>&-; exec {shlex.quote(sys.executable)} -m latentspace info", shell=True,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_search_names_the_rows_that_its_weights_make_unusable(tmp_path, rng, capsys):
    """Rows whose squared norm scaled by the weights overflows float32 are refused by the
    search. The error named the API's "database" for a row of the index file and, for a query
    in a later --batch-size chunk, "queries" with its row number inside the chunk (row 7 for
    the file's row 37)."""
    import numpy as np

    Z = rng.standard_normal((100, 4)).astype(np.float32)
    Q = rng.standard_normal((40, 4)).astype(np.float32)
    np.save(tmp_path / "ones.npy", np.ones(4, np.float32))
    np.save(tmp_path / "heavy.npy", np.full(4, 1e4, np.float32))
    Q[37] = 1e18  # plain squared norm 4e36: usable; weighted by 1e4, 4e40: not
    np.save(tmp_path / "Q.npy", Q)
    idx, out = str(tmp_path / "i.lsidx"), str(tmp_path / "r.npz")
    code, _, err = _main(capsys, "index", "build", _save(tmp_path / "Z.npy", Z), "--out", idx,
                         "--metric", "weighted_l2", "--weights", str(tmp_path / "ones.npy"))
    assert code == 0, err
    err = _pipeline_error(capsys, "search", "search", idx, str(tmp_path / "Q.npy"), "--out", out,
                          "--batch-size", "10", "--weights", str(tmp_path / "heavy.npy"))
    assert err.startswith(f"latentspace search: error: {tmp_path / 'Q.npy'}: row 37 contains "), err
    assert "scaled by the weights" in err and "lower the weights" in err
    Z[99] = 1e18
    code, _, err = _main(capsys, "index", "build", _save(tmp_path / "Z.npy", Z), "--out", idx,
                         "--metric", "weighted_l2", "--weights", str(tmp_path / "ones.npy"))
    assert code == 0, err  # usable with the index's weights; not with the search's
    err = _pipeline_error(capsys, "search", "search", idx, _save(tmp_path / "Q.npy", Q[:5]), "--out", out,
                          "--weights", str(tmp_path / "heavy.npy"))
    assert err.startswith(f"latentspace search: error: {idx}: row 99 contains NaN or Inf"), err
    assert not os.path.exists(out)


def test_search_names_the_first_refused_query_whichever_its_kind(tmp_path, rng, capsys):
    """A query the weights refuse before a NaN one: the first in row order is named, in the
    weighted words, as latentspace.knn names it (the NaN row was named first)."""
    import numpy as np

    Z = rng.standard_normal((30, 4)).astype(np.float32)
    Q = rng.standard_normal((20, 4)).astype(np.float32)
    np.save(tmp_path / "heavy.npy", np.full(4, 1e4, np.float32))
    Q[11] = 1e18  # weighted by 1e4: 4e40
    Q[13, 2] = np.nan
    idx, out = str(tmp_path / "i.lsidx"), str(tmp_path / "r.npz")
    code, _, err = _main(capsys, "index", "build", _save(tmp_path / "Z.npy", Z), "--out", idx,
                         "--metric", "weighted_l2", "--weights", str(tmp_path / "heavy.npy"))
    assert code == 0, err
    with pytest.raises(ValueError) as api:
        latentspace.knn(Q, Z, 3, "weighted_l2", weights=np.full(4, 1e4, np.float32))
    assert str(api.value).startswith("queries: row 11 ")
    err = _pipeline_error(capsys, "search", "search", idx, _save(tmp_path / "Q.npy", Q), "--out", out,
                          "--batch-size", "8")
    assert err.startswith(f"latentspace search: error: {tmp_path / 'Q.npy'}: row 11 "), err
    assert err.split(": row 11 ", 1)[1] == str(api.value).split(": row 11 ", 1)[1] + "\n", err


def test_index_build_refuses_rows_that_its_weights_make_unusable(tmp_path, rng, capsys):
    """They were written into the index, whose every search with its own weights then failed."""
    import numpy as np

    Z = rng.standard_normal((100, 4)).astype(np.float32)
    Z[77] = 1e18  # plain squared norm 4e36: usable; weighted by 1e4, 4e40: not
    np.save(tmp_path / "heavy.npy", np.full(4, 1e4, np.float32))
    idx = tmp_path / "i.lsidx"
    err = _pipeline_error(capsys, "index build", "index", "build", _save(tmp_path / "Z.npy", Z), "--out", str(idx),
                          "--metric", "weighted_l2", "--weights", str(tmp_path / "heavy.npy"), "--batch-size", "30")
    assert err.startswith(f"latentspace index build: error: {tmp_path / 'Z.npy'}: row 77: its squared norm scaled "
                          "by the index's weights"), err  # (the file's row, in the third chunk)
    assert not idx.exists()


def _save(path, array) -> str:
    import numpy as np

    np.save(path, array)
    return str(path)


@pytest.mark.parametrize("options,flag", [
    (["--model", "autoencoder", "--beta", "4"], "--beta"),
    (["--model", "autoencoder", "--beta", "0"], "--beta"),
    (["--model", "conv", "--kl-warmup", "5"], "--kl-warmup"),
    (["--model", "vae", "--whiten"], "--whiten"),
    (["--model", "pca", "--hidden", "32"], "--hidden"),
    (["--model", "conv", "--hidden", "32"], "--hidden"),
    (["--model", "vae", "--channels", "4"], "--channels"),
    (["--model", "autoencoder", "--image-shape", "1,8,8"], "--image-shape"),
    (["--model", "autoencoder", "--metric-weight", "2"], "--metric-weight"),
])
def test_train_refuses_a_flag_its_model_does_not_use(tmp_path, capsys, options, flag):
    """Each was dropped without a word: `--model autoencoder --beta 4` trained and saved a
    plain autoencoder, and --metric-weight without --metric-loss was ignored (the Python API
    refuses metric_weight without metric_loss)."""
    out = tmp_path / "run"
    code, _, err = _main(capsys, "train", "digits", *options, "--epochs", "1", "--out", str(out), "--no-progress")
    assert code == 2 and err.startswith(f"latentspace train: error: {flag}: "), err
    assert not out.exists()  # refused before the folder is made


@pytest.mark.parametrize("options,message", [
    (["--latent-dim", "100"], "--latent-dim: PCA(latent_dim=100) cannot exceed"),
    (["-k", "0"], "-k: expected an integer >= 1"),
])
def test_a_failed_demo_removes_the_folder_it_made_and_keeps_the_users(tmp_path, capsys, options, message):
    """--out was made before PCA and the metrics checked --latent-dim and -k: a refused run
    left an empty folder behind (as train did before made_folder)."""
    deep = tmp_path / "new" / "pictures"
    args = ["demo", "--models", "autoencoder", "--epochs", "1", "--no-metric-learning", "--examples", "0", *options]
    code, _, err = _main(capsys, *args, "--out", str(deep))
    assert code == 2 and message in err, err
    assert not (tmp_path / "new").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    code, _, _ = _main(capsys, *args, "--out", str(mine))
    assert code == 2 and mine.is_dir()  # the user's own folder stays


def test_an_input_of_the_wrong_kind_is_named_by_its_file_not_path(pipeline_files, capsys):
    """The readers' 'path: ...' (the Python API's parameter, which no command has) reached the
    shell as it was: 'error: path: expected a .npy, .npz, .hdf5 or .h5 file, got x.txt'."""
    tmp, _, _, _ = pipeline_files
    m, data, text = str(tmp / "model.safetensors"), str(tmp / "x.npy"), str(tmp / "x.txt")
    (tmp / "x.txt").write_text("1 2 3\n")
    for command, args in [("index build", ["index", "build", text, "--out", str(tmp / "i.lsidx")]),
                          ("encode", ["encode", m, text, "--out", str(tmp / "z.npy")]),
                          ("encode", ["encode", str(tmp), data, "--out", str(tmp / "z.npy")]),
                          ("train", ["train", text, "--model", "pca", "--out", str(tmp / "run")])]:
        err = _pipeline_error(capsys, command, *args)
        assert "path: " not in err and (text in err or f"{tmp} is a folder" in err), err


def test_plot_relevance_method_lists_only_what_can_be_typed(plot_files, capsys):
    """relevance()'s 'expected one of ... or None' reached the shell: None is no --method."""
    tmp = plot_files
    err = _pipeline_error(capsys, "plot", "plot", "relevance", str(tmp / "pca.safetensors"), str(tmp / "x.npy"),
                          "--method", "anova", "--out", str(tmp / "r.png"))
    assert err == ("latentspace plot: error: --method: expected one of 'fisher', 'mutual_info', 'variance', 'kl' "
                   "for relevance, got 'anova'\n"), err


# ---------------------------------------------------------------------------------------
# Long values in errors, and output names too long for the file system


def _clipped_value_in(err: str, value: str) -> None:
    """err shows `value` clipped: its start and end, and its length, never the whole of it."""
    assert value not in err and f"({len(value):,} characters)" in err, err[:500]
    assert value[:100] in err and value[-40:] in err, err[:500]
    assert len(err) < 600, len(err)


def test_echoed_clips_long_values_only():
    from latentspace.cli_pipeline import echoed

    assert echoed("short") == "short" and echoed("short", quoted=True) == "'short'"
    value = "a" * 150 + "b" * 9700 + "c" * 150
    for quoted in (False, True):
        shown = echoed(value, quoted=quoted)
        assert len(shown) < 250 and shown.endswith(" (10,000 characters)"), shown
        assert shown.startswith(("'" if quoted else "") + "a" * 100) and "...cc" in shown and "b" * 500 not in shown


@pytest.mark.parametrize("case", ["index build --out", "train --hidden", "demo --models", "missing input",
                                  "plot --queries", "plot --image-shape"])
def test_long_values_are_clipped_in_errors(tmp_path, capsys, case):
    """Each error printed the value whole: a 10,000-character --out or list filled the terminal."""
    import numpy as np

    np.save(tmp_path / "z.npy", np.ones((5, 3), np.float32))
    long_list = ",".join(["1x"] * 3000)
    deep = str(tmp_path / "/".join(["d" * 90] * 30) / "z.npy")  # short parts, none of them there
    argv, command, value = {
        "index build --out": (["index", "build", str(tmp_path / "z.npy"), "--out", "x" * 10000], "index build",
                              "x" * 10000),
        "train --hidden": (["train", "digits", "--hidden", long_list, "--out", str(tmp_path / "run")], "train",
                           long_list),
        "demo --models": (["demo", "--models", long_list, "--out", str(tmp_path / "d")], "demo", long_list),
        "missing input": (["index", "build", deep, "--out", str(tmp_path / "i.lsidx")], "index build", deep),
        "plot --queries": (["plot", "neighbors", "PCA", "digits", "--queries", long_list], "plot", long_list),
        "plot --image-shape": (["plot", "reconstructions", "PCA", "digits", "--image-shape", long_list], "plot",
                               long_list),
    }[case]
    if "PCA" in argv:
        latentspace.save_model(latentspace.PCA(4).fit(latentspace.datasets.load_digits()[0]), tmp_path / "m.st")
        argv[argv.index("PCA")] = str(tmp_path / "m.st")
        argv += ["--out", str(tmp_path / "p.png")]
    err = _pipeline_error(capsys, command, *argv)
    _clipped_value_in(err, value)


@pytest.mark.parametrize("argv", [["search", "i.lsidx", "q.npy", "--out", "r.npz", "-k", "x" * 5000],
                                  ["index", "build", "z.npy", "--out", "i.lsidx", "--metric", "m" * 5000]])
def test_long_values_are_clipped_in_usage_errors(capsys, argv):
    """argparse's own messages (invalid int value, invalid choice) echoed them whole too."""
    from latentspace.cli import build_parser

    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    _clipped_value_in(err.splitlines()[-1], argv[-1])


def _name_max(folder) -> int:
    return os.pathconf(folder, "PC_NAME_MAX")


@pytest.mark.skipif(not hasattr(os, "pathconf"), reason="the file system's limits are read with os.pathconf")
@pytest.mark.parametrize("command", ["index build", "encode", "search", "plot", "train", "demo"])
def test_an_output_name_too_long_names_the_option(pipeline_files, capsys, command):
    """Each said "[Errno 36] File name too long: '...'" (the whole name), naming no option."""
    import numpy as np

    tmp, model, x, q = pipeline_files
    m, data = str(tmp / "model.safetensors"), str(tmp / "x.npy")
    np.save(tmp / "z.npy", latentspace.encode(model, x))
    index = latentspace.FlatIndex(4)
    index.add(np.load(tmp / "z.npy"))
    index.save(tmp / "i.lsidx")
    suffix = {"index build": ".lsidx", "encode": ".npy", "search": ".npz", "plot": ".png", "train": "",
              "demo": ""}[command]
    name = "n" * 300 + suffix
    out = str(tmp / name)
    argv = {"index build": ["index", "build", str(tmp / "z.npy")], "encode": ["encode", m, data],
            "search": ["search", str(tmp / "i.lsidx"), str(tmp / "z.npy")], "plot": ["plot", "map", m, data],
            "train": ["train", "digits", "--model", "pca"], "demo": ["demo", "--no-metric-learning"]}[command]
    err = _pipeline_error(capsys, command, *argv, "--out", out)
    assert (f"error: --out: file name too long ({len(name)} characters in one path component; the file system "
            f"allows {_name_max(tmp)})") in err, err
    assert sorted(p.name for p in tmp.iterdir() if p.name.startswith(("n", ".n"))) == []


# ---------------------------------------------------------------------------------------
# Compressed and chunked inputs, streamed: a compressed .npz member or a chunked / compressed
# HDF5 dataset was read whole before the first row was used (a 50 GB file: out of memory)

_BIG_ROWS = 200_000  # x 64 float32: 48.8 MiB of rows (45 MiB as np.savez_compressed writes them)


@pytest.fixture(scope="module")
def big_inputs(tmp_path_factory):
    """The same 200,000 x 64 float32 rows as a .npy, a compressed .npz and a chunked, gzip
    compressed HDF5 train set; 100,000 of them as float64 (.npy and compressed .npz); a model
    of 64 -> 8 and an index of 50 rows of 64 dimensions (for the rows as queries)."""
    import numpy as np
    import torch

    tmp = tmp_path_factory.mktemp("big")
    h5py = pytest.importorskip("h5py")
    x = np.random.default_rng(7).standard_normal((_BIG_ROWS, 64)).astype(np.float32)
    np.save(tmp / "x.npy", x)
    np.savez_compressed(tmp / "x.npz", x=x)
    with h5py.File(tmp / "x.hdf5", "w") as f:
        f.attrs["distance"] = "euclidean"
        f.create_dataset("train", data=x, chunks=(1000, 64), compression="gzip", compression_opts=1)
        f.create_dataset("test", data=x[:5])
        f.create_dataset("neighbors", data=np.zeros((5, 1), np.int64))
        f.create_dataset("distances", data=np.zeros((5, 1), np.float32))
    np.save(tmp / "x64.npy", x[: _BIG_ROWS // 2].astype(np.float64) * 1.5)
    np.savez_compressed(tmp / "x64.npz", x=np.load(tmp / "x64.npy"))
    torch.manual_seed(0)
    latentspace.save_model(latentspace.Autoencoder(64, 8, hidden=(32,)).eval(), tmp / "model.safetensors")
    index = latentspace.FlatIndex(64)
    index.add(x[:50])
    index.save(tmp / "small.lsidx")
    return tmp


def _traced_main(capsys, *args: str) -> tuple[int, str, str, int]:
    """_main, and the peak of the memory allocated meanwhile by Python and numpy (whose data
    buffers tracemalloc traces); memory maps and torch's buffers are not counted."""
    import tracemalloc

    tracemalloc.start()
    try:
        code, out, err = _main(capsys, *args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return code, out, err, peak


def _pipeline_run(tmp, command: str, data: str, out: str) -> list[str]:
    return {"encode": ["encode", str(tmp / "model.safetensors"), str(tmp / data), "--out", str(tmp / f"{out}.npy")],
            "index build": ["index", "build", str(tmp / data), "--out", str(tmp / f"{out}.lsidx")],
            "search": ["search", str(tmp / "small.lsidx"), str(tmp / data), "-k", "1", "--out",
                       str(tmp / f"{out}.npz")]}[command]


def _same_output(tmp, command: str, a: str, b: str) -> None:
    import numpy as np

    if command == "encode":
        np.testing.assert_array_equal(np.load(tmp / f"{a}.npy"), np.load(tmp / f"{b}.npy"))
    elif command == "index build":  # the same bytes: rows, header and checksum
        assert (tmp / f"{a}.lsidx").read_bytes() == (tmp / f"{b}.lsidx").read_bytes()
    else:
        with np.load(tmp / f"{a}.npz") as first, np.load(tmp / f"{b}.npz") as second:
            for name in ("distances", "indices"):
                np.testing.assert_array_equal(first[name], second[name])


@pytest.mark.parametrize("data", ["x.npz", "x.hdf5"])
@pytest.mark.parametrize("command", ["encode", "index build", "search"])
def test_compressed_inputs_stream_with_bounded_memory(big_inputs, capsys, command, data):
    """48.8 MiB of rows, read 4,096 rows (1 MiB) at a time: the peak stays under a quarter of
    the rows (it was above all of them, 49 to 53 MiB), and the output is the one the .npy gives,
    byte for byte. (The .npy runs first: it also loads what the command loads on first use.)"""
    tmp = big_inputs
    code, _, err = _main(capsys, *_pipeline_run(tmp, command, "x.npy", "mapped"), "--batch-size", "4096")
    assert code == 0, err
    code, _, err, peak = _traced_main(capsys, *_pipeline_run(tmp, command, data, "streamed"), "--batch-size", "4096")
    assert code == 0, err
    rows_bytes = _BIG_ROWS * 64 * 4
    assert peak < rows_bytes / 4, f"{command} {data}: peak {peak / 2**20:.1f} MiB for {rows_bytes / 2**20:.1f} MiB"
    _same_output(tmp, command, "streamed", "mapped")


@pytest.mark.parametrize("command", ["encode", "index build"])
def test_a_compressed_input_of_another_dtype_is_converted_block_by_block(big_inputs, capsys, command):
    """float64 rows (48.8 MiB as float64) become float32 a block at a time, never whole: the
    same codes, the same index as from the float64 .npy."""
    tmp = big_inputs
    code, _, err = _main(capsys, *_pipeline_run(tmp, command, "x64.npy", "mapped64"), "--batch-size", "4096")
    assert code == 0, err
    code, _, err, peak = _traced_main(capsys, *_pipeline_run(tmp, command, "x64.npz", "streamed64"),
                                      "--batch-size", "4096")
    assert code == 0, err
    rows_bytes = _BIG_ROWS // 2 * 64 * 8
    assert peak < rows_bytes / 4, f"{command}: peak {peak / 2**20:.1f} MiB for {rows_bytes / 2**20:.1f} MiB"
    _same_output(tmp, command, "streamed64", "mapped64")


def test_search_encodes_streamed_queries_as_it_encodes_mapped_ones(pipeline_files, capsys):
    import numpy as np

    tmp, model, x, q = pipeline_files
    np.savez_compressed(tmp / "q.npz", q=q)
    code, _, err = _main(capsys, "encode", str(tmp / "model.safetensors"), str(tmp / "x.npy"),
                         "--out", str(tmp / "z.npy"))
    assert code == 0, err
    code, _, err = _main(capsys, "index", "build", str(tmp / "z.npy"), "--out", str(tmp / "z.lsidx"))
    assert code == 0, err
    for queries, out in (("q.npz", "a.npz"), ("q.npy", "b.npz")):
        code, _, err = _main(capsys, "search", str(tmp / "z.lsidx"), str(tmp / queries), "-k", "5", "--model",
                             str(tmp / "model.safetensors"), "--out", str(tmp / out), "--batch-size", "4")
        assert code == 0, err
    with np.load(tmp / "a.npz") as a, np.load(tmp / "b.npz") as b:
        np.testing.assert_array_equal(a["indices"], b["indices"])
        np.testing.assert_array_equal(a["distances"], b["distances"])


def test_streamed_inputs_give_the_errors_of_mapped_ones(pipeline_files, capsys):
    """A wrong shape or a NaN row reads as it does for the same rows in a .npy: the file's
    shape and the file's row (not the block's)."""
    import numpy as np

    tmp, model, x, _ = pipeline_files
    m = str(tmp / "model.safetensors")
    bad = x.copy()
    bad[9, 5] = np.nan
    np.save(tmp / "codes.npy", latentspace.encode(model, x))
    index = latentspace.FlatIndex(4)
    index.add(np.load(tmp / "codes.npy"))
    index.save(tmp / "i.lsidx")
    arrays = {"wide": np.zeros((30, 65), np.float32), "bad": bad, "flat": np.zeros(5, np.float32),
              "badcodes": np.where(np.arange(300)[:, None] == 9, np.nan, np.load(tmp / "codes.npy")).astype(np.float32)}
    for name, array in arrays.items():
        np.save(tmp / f"{name}.npy", array)
        np.savez_compressed(tmp / f"{name}.npz", a=array)
    cases = [("encode", ["encode", m, "{wide}", "--out", str(tmp / "z.npy"), "--batch-size", "4"]),
             ("encode", ["encode", m, "{bad}", "--out", str(tmp / "z.npy"), "--batch-size", "4"]),
             ("encode", ["encode", m, "{flat}", "--out", str(tmp / "z.npy")]),
             ("index build", ["index", "build", "{badcodes}", "--out", str(tmp / "i2.lsidx"), "--batch-size", "4"]),
             ("index build", ["index", "build", "{flat}", "--out", str(tmp / "i2.lsidx")]),
             ("search", ["search", str(tmp / "i.lsidx"), "{bad}", "--model", m, "--out", str(tmp / "r.npz")]),
             ("search", ["search", str(tmp / "i.lsidx"), "{badcodes}", "--out", str(tmp / "r.npz"),
                         "--batch-size", "4"]),
             ("search", ["search", str(tmp / "i.lsidx"), "{wide}", "--out", str(tmp / "r.npz")])]
    for command, argv in cases:
        errors = {}
        for suffix in (".npy", ".npz"):
            typed = [arg.format(**{name: str(tmp / f"{name}{suffix}") for name in arrays}) for arg in argv]
            errors[suffix] = _pipeline_error(capsys, command, *typed)
        assert errors[".npz"] == errors[".npy"].replace(".npy:", ".npz:"), errors
    assert not (tmp / "z.npy").exists() and not (tmp / "i2.lsidx").exists() and not (tmp / "r.npz").exists()


def test_damaged_compressed_inputs_are_one_line_errors(pipeline_files, capsys):
    """A truncated archive, a damaged deflate stream, and a member that decompresses but fails
    its CRC (its garbage holding a NaN row: the damage is named, not the row) are each one
    error line naming the file, with no output left behind."""
    import numpy as np

    tmp, model, x, _ = pipeline_files
    m = str(tmp / "model.safetensors")
    np.savez_compressed(tmp / "x.npz", x=x)
    raw = (tmp / "x.npz").read_bytes()
    (tmp / "cut.npz").write_bytes(raw[: len(raw) // 2])
    damaged = bytearray(raw)
    start = raw.index(b"PK\x03\x04") + 30 + len("x.npy") + 200  # inside the deflate stream, past the header
    damaged[start : start + 64] = bytes(64)
    (tmp / "garbled.npz").write_bytes(bytes(damaged))
    bad = x.copy()
    bad[9, 5] = np.nan
    np.savez_compressed(tmp / "crc.npz", x=bad)
    crc = bytearray((tmp / "crc.npz").read_bytes())
    for signature, offset in ((b"PK\x03\x04", 14), (b"PK\x01\x02", 16)):
        at = crc.index(signature) + offset
        crc[at : at + 4] = bytes(4)
    (tmp / "crc.npz").write_bytes(bytes(crc))
    before = _files(tmp)
    for name, message in [("cut.npz", "cut.npz: not an .npz archive"),
                          ("garbled.npz", "garbled.npz: array 'x' is not readable ("),
                          ("crc.npz", "crc.npz: array 'x' is not readable (Bad CRC-32")]:
        for command, argv in [("encode", ["encode", m, str(tmp / name), "--out", str(tmp / "z.npy"),
                                          "--batch-size", "4"]),
                              ("index build", ["index", "build", str(tmp / name), "--out", str(tmp / "i.lsidx"),
                                               "--batch-size", "4"])]:
            err = _pipeline_error(capsys, command, *argv)
            assert message in err, (name, err)
    assert _files(tmp) == before


def test_a_missing_input_file_is_worded_as_the_shell_words_it(tmp_path, capsys):
    """The OS's "[Errno 2] No such file or directory: 'm.npy'" becomes "m.npy: No such file or
    directory", the file first, as any shell tool says it."""
    missing = str(tmp_path / "m.npy")
    code, out, err = _main(capsys, "index", "build", missing, "--out", str(tmp_path / "i.lsidx"))
    assert code != 0
    assert f"error: {missing}: No such file or directory" in err and "[Errno" not in err, err


def test_info_says_which_row_check_a_gpu_search_makes():
    result = _cli("info", env={"LATENTSPACE_CUDA_ROW_CHECK": "native"})
    assert result.returncode == 0, result.stderr
    assert "row check on a GPU: CUDA kernels (LATENTSPACE_CUDA_ROW_CHECK" in result.stdout
    result = _cli("info", env={"LATENTSPACE_CUDA_ROW_CHECK": "2"})
    assert result.returncode == 0, result.stderr
    assert "row check on a GPU: invalid (LATENTSPACE_CUDA_ROW_CHECK: expected" in result.stdout
