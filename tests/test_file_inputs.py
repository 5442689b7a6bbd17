"""Every file a user names, to the Python API or the command line, is refused up front when it
is a FIFO: opening one with no writer blocks forever. (load_index and the datasets loaders
have their own FIFO tests; these cover load_model and the CLI's other file options.)"""

from __future__ import annotations

import errno
import os
import threading

import numpy as np
import pytest

import latentspace
from latentspace.cli import main
from latentspace.models import ModelFileError


@pytest.fixture
def fifo(tmp_path):
    """make(name): a FIFO with no writer. A fixed loader never opens it; should one open it
    (the bug), a watchdog opens and closes the write end, so the reader sees end-of-file
    and the test fails instead of hanging."""
    done = threading.Event()
    paths = []

    def unblock_readers():
        while not done.wait(0.05):
            for path in paths:
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # succeeds only with a reader
                except OSError as error:
                    if error.errno != errno.ENXIO:  # ENXIO: no reader, nothing to unblock
                        raise

    def make(name: str):
        path = tmp_path / name
        os.mkfifo(path)
        paths.append(path)
        return path

    watchdog = threading.Thread(target=unblock_readers, daemon=True)
    watchdog.start()
    yield make
    done.set()
    watchdog.join()


def test_load_model_refuses_a_fifo(fifo):
    path = fifo("model.safetensors")
    with pytest.raises(ModelFileError, match="model.safetensors: not a regular file"):
        latentspace.load_model(path)


def test_load_model_names_a_folder(tmp_path):
    with pytest.raises(IsADirectoryError, match=f"path: {tmp_path} is a folder; pass a model file"):
        latentspace.load_model(tmp_path)


@pytest.fixture
def files(tmp_path):
    """A model, data rows, codes and a weighted_l2 index: the CLI's good inputs."""
    import torch

    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    latentspace.save_model(latentspace.Autoencoder(6, 3, hidden=(8,)), tmp_path / "model.safetensors")
    np.save(tmp_path / "x.npy", rng.random((40, 6)).astype(np.float32))
    np.save(tmp_path / "z.npy", rng.random((40, 3)).astype(np.float32))
    index = latentspace.FlatIndex(3, "weighted_l2")
    index.add(np.load(tmp_path / "z.npy"))
    index.save(tmp_path / "w.lsidx")
    return tmp_path


@pytest.mark.parametrize("option", ["encode MODEL", "train --labels", "index build --weights", "search --weights"])
def test_cli_refuses_a_fifo(files, fifo, capsys, option):
    """One error line naming the FIFO, exit status 2; before, np.load / read_bytes blocked."""
    tmp = str(files)
    pipe = str(fifo("fifo.npy"))
    argv = {
        "encode MODEL": ["encode", pipe, f"{tmp}/x.npy", "--out", f"{tmp}/codes.npy"],
        "train --labels": ["train", f"{tmp}/x.npy", "--model", "autoencoder", "--metric-loss", "supcon",
                           "--labels", pipe, "--epochs", "1", "--no-progress", "--out", f"{tmp}/run"],
        "index build --weights": ["index", "build", f"{tmp}/z.npy", "--metric", "weighted_l2", "--weights", pipe,
                                  "--out", f"{tmp}/i.lsidx"],
        "search --weights": ["search", f"{tmp}/w.lsidx", f"{tmp}/z.npy", "--weights", pipe,
                             "--out", f"{tmp}/r.npz"],
    }[option]
    before = sorted(os.listdir(tmp))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{pipe}: not a regular file (a FIFO or a device)" in err, err
    if "--" in option:
        assert f"error: {option.split()[-1]}: " in err, err  # the option is named
    assert sorted(os.listdir(tmp)) == before  # no output written


@pytest.mark.parametrize("name", ["fifo.npz", "fifo.hdf5", "fifo.npy"])
@pytest.mark.parametrize("command", ["encode DATA", "index build VECTORS", "search QUERIES"])
def test_cli_refuses_a_fifo_as_the_rows_it_reads(files, fifo, capsys, name, command):
    """The rows encode, index build and search read (a block at a time when compressed or
    chunked) are refused up front as a FIFO too, whatever the suffix."""
    tmp = str(files)
    pipe = str(fifo(name))
    argv = {"encode DATA": ["encode", f"{tmp}/model.safetensors", pipe, "--out", f"{tmp}/codes.npy"],
            "index build VECTORS": ["index", "build", pipe, "--out", f"{tmp}/i.lsidx"],
            "search QUERIES": ["search", f"{tmp}/w.lsidx", pipe, "--out", f"{tmp}/r.npz"]}[command]
    before = sorted(os.listdir(tmp))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{pipe}: not a regular file (a FIFO or a device)" in err, err
    assert sorted(os.listdir(tmp)) == before


@pytest.mark.parametrize("how", ["external link", "external storage"])
@pytest.mark.parametrize("command", ["encode DATA", "index build VECTORS", "search QUERIES", "train DATA"])
def test_cli_refuses_an_hdf5_part_stored_in_another_file(files, capsys, how, command):
    """An ann-benchmarks file whose train set is an external link to another file, or stored in
    one (HDF5's external storage): HDF5 opened whatever that names, and on a FIFO blocked
    forever, deaf to Ctrl-C (a regular file here: a FIFO would hang this test if it failed)."""
    h5py = pytest.importorskip("h5py")
    tmp = str(files)
    x = np.load(f"{tmp}/x.npy")
    with h5py.File(f"{tmp}/other.h5", "w") as other:
        other.create_dataset("train", data=x)
    with h5py.File(f"{tmp}/linked.hdf5", "w") as f:
        if how == "external link":
            f["train"] = h5py.ExternalLink(f"{tmp}/other.h5", "/train")
        else:
            f.create_dataset("train", shape=x.shape, dtype=x.dtype, external=[(f"{tmp}/x.npy", 128, x.nbytes)])
        f.create_dataset("test", data=x[:2])
        f.create_dataset("neighbors", data=np.zeros((2, 1), np.int64))
        f.create_dataset("distances", data=np.zeros((2, 1), np.float32))
    data = f"{tmp}/linked.hdf5"
    argv = {"encode DATA": ["encode", f"{tmp}/model.safetensors", data, "--out", f"{tmp}/codes.npy"],
            "index build VECTORS": ["index", "build", data, "--out", f"{tmp}/i.lsidx"],
            "search QUERIES": ["search", f"{tmp}/w.lsidx", data, "--out", f"{tmp}/r.npz"],
            "train DATA": ["train", data, "--model", "pca", "--latent-dim", "2", "--out", f"{tmp}/run"]}[command]
    before = sorted(os.listdir(tmp))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"error: {data}: " in err and "another file" in err and "expected its data in this file" in err, err
    assert sorted(os.listdir(tmp)) == before
