"""The command line's usage errors, refused up front and by name: an empty --out for every
command that writes one, labels that are no integer classes (strings, objects, floats), and a
demo --show larger than the neighbours its -k searches."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import CHEAP_DEMO, run_cli_main

from latentspace.cli import main



_main = run_cli_main


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A model, data, vectors and an index to point the file commands at."""
    tmp = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    np.save(tmp / "x.npy", rng.random((40, 6)).astype(np.float32))
    assert main(["train", str(tmp / "x.npy"), "--model", "pca", "--latent-dim", "2", "--out", str(tmp / "pca")]) == 0
    assert main(["index", "build", str(tmp / "x.npy"), "--out", str(tmp / "x.lsidx")]) == 0
    return tmp


# ---------------------------------------------------------------------------------------
# --out ''


@pytest.mark.parametrize("model", ["pca", "autoencoder"])
def test_train_refuses_an_empty_out_before_any_work(model, tmp_path, capsys, monkeypatch):
    """--out '' (an unset shell variable) trained the model and wrote model.safetensors and
    history.json into the current folder, over any of the user's files of those names."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "history.json").write_text("mine")
    code, printed, err = _main(capsys, "train", "digits", "--model", model, "--epochs", "1", "--out", "")
    assert code == 2 and err == "latentspace train: error: --out: empty; expected a folder's path\n", err
    assert printed == ""  # not even the data loaded and the model built
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.json"]
    assert (tmp_path / "history.json").read_text() == "mine"


@pytest.mark.parametrize("command,suffix", [("encode", ".npy"), ("index build", ".lsidx"), ("search", ".npz"),
                                            ("plot", ".png")])
def test_file_commands_refuse_an_empty_out_as_empty(command, suffix, files, capsys):
    """--out '' was refused as 'expected a file name ending in .npy, got ''', which reads as a
    wrong suffix, not as the missing name it is."""
    model, x, index = str(files / "pca" / "model.safetensors"), str(files / "x.npy"), str(files / "x.lsidx")
    args = {"encode": ["encode", model, x], "index build": ["index", "build", x],
            "search": ["search", index, x], "plot": ["plot", "map", model, x]}[command]
    code, printed, err = _main(capsys, *args, "--out", "")
    assert code == 2, err
    assert err == f"latentspace {command}: error: --out: empty; expected a file name ending in {suffix}\n", err
    assert printed == ""


# ---------------------------------------------------------------------------------------
# --labels that are no integer classes


def _label_files(tmp) -> list[tuple[str, str]]:
    """Label files of 40 rows whose dtype is no integer: (that dtype as the message names it,
    the file's name)."""
    names = np.array(list("ab") * 20)
    np.save(tmp / "strings.npy", names)
    np.savez(tmp / "strings.npz", y=names)
    np.save(tmp / "objects.npy", names.astype(object), allow_pickle=True)
    np.savez(tmp / "objects.npz", y=names.astype(object))
    np.save(tmp / "floats.npy", (np.arange(40) % 2).astype(np.float64))
    np.save(tmp / "bools.npy", np.arange(40) % 2 == 0)
    return [("<U1", "strings.npy"), ("<U1", "strings.npz"), ("object", "objects.npy"), ("object", "objects.npz"),
            ("float64", "floats.npy"), ("bool", "bools.npy")]


def _assert_integer_labels_expected(err: str, command: str, dtype: str, path: str) -> None:
    assert err.startswith(f"latentspace {command}: error: --labels: expected integer class labels, got dtype "
                          f"{dtype} in {path}"), err
    assert "real numbers" not in err and "save an array of numbers" not in err and err.count("\n") == 1, err


def test_train_refuses_labels_that_are_no_integers_by_their_dtype(files, tmp_path, capsys):
    """String labels were refused as 'has dtype <U1; expected real numbers (float32 preferred)',
    which asks for floats, that train refuses next; object labels as 'save an array of numbers'."""
    for dtype, name in _label_files(tmp_path):
        path = str(tmp_path / name)
        code, printed, err = _main(capsys, "train", str(files / "x.npy"), "--model", "autoencoder", "--epochs", "1",
                                   "--metric-loss", "supcon", "--labels", path, "--out", str(tmp_path / "run"))
        assert code == 2, err
        _assert_integer_labels_expected(err, "train", dtype, path)
        assert printed == "" and not (tmp_path / "run").exists()  # refused before the model is built


def test_plot_refuses_labels_that_are_no_integers_by_their_dtype(files, tmp_path, capsys):
    model, x = str(files / "pca" / "model.safetensors"), str(files / "x.npy")
    for dtype, name in _label_files(tmp_path):
        path = str(tmp_path / name)
        code, _, err = _main(capsys, "plot", "map", model, x, "--labels", path, "--out", str(tmp_path / "m.png"))
        assert code == 2, err
        _assert_integer_labels_expected(err, "plot", dtype, path)
        assert not (tmp_path / "m.png").exists()


def test_string_labels_are_told_how_to_become_classes(tmp_path, capsys, files):
    """The message says what to do with class names: number them."""
    _label_files(tmp_path)
    code, _, err = _main(capsys, "plot", "map", str(files / "pca" / "model.safetensors"), str(files / "x.npy"),
                         "--labels", str(tmp_path / "strings.npy"), "--out", str(tmp_path / "m.png"))
    assert code == 2 and "np.unique(" in err and "return_inverse=True" in err, err


def test_integer_labels_still_plot(files, tmp_path, capsys):
    np.save(tmp_path / "y.npy", np.arange(40) % 3)
    code, printed, err = _main(capsys, "plot", "map", str(files / "pca" / "model.safetensors"), str(files / "x.npy"),
                               "--labels", str(tmp_path / "y.npy"), "--out", str(tmp_path / "m.png"))
    assert code == 0, err
    assert (tmp_path / "m.png").read_bytes().startswith(b"\x89PNG")


# ---------------------------------------------------------------------------------------
# demo --show and -k


def test_demo_refuses_show_beyond_k_before_training(tmp_path, capsys):
    """--show 5 with -k 3 drew 3 neighbours per digit without a word."""
    code, printed, err = _main(capsys, *CHEAP_DEMO, "-k", "3", "--show", "5", "--out", str(tmp_path / "d"))
    assert code == 2, err
    assert err == ("latentspace demo: error: --show: 5 neighbours drawn per digit, but -k searches 3; "
                   "lower --show or raise -k\n"), err
    assert "epochs in" not in printed
    assert not (tmp_path / "d").exists()


def test_demo_default_show_follows_a_small_k(tmp_path, capsys):
    """Only a --show the user typed is refused: -k 2 alone draws its 2 neighbours (the default
    --show, 4, is cut to -k)."""
    args = ["demo", "--models", "autoencoder", "--epochs", "1", "--no-metric-learning", "--examples", "1", "-k", "2"]
    code, printed, err = _main(capsys, *args, "--out", str(tmp_path / "d"))
    assert code == 0, err
    assert re.search(r"digit #\d+ \(label \d\) and its 2 nearest neighbours", printed), printed
