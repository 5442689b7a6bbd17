"""`latentspace demo` and `latentspace plot` as a demanding user stresses them: input the demo
can only fail on after its training is refused before it (one line naming the flag, exit 2),
and pictures too large to draw in bounded time and memory are refused by name."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import CHEAP_DEMO, run_cli_main

pytest.importorskip("matplotlib")

import latentspace as ls  # noqa: E402
from latentspace import plots  # noqa: E402
from latentspace.cli_demo import PICTURES  # noqa: E402



_main = run_cli_main


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-m", "latentspace", *args, "--threads", "1"], capture_output=True,
                          text=True, timeout=180, env=full_env)


# ---------------------------------------------------------------------------------------
# latentspace demo: refused before the training


def test_demo_refuses_a_picture_path_it_cannot_write_before_training(tmp_path, capsys):
    """A folder named latent_map.png in --out failed only after every model was trained, with
    'lm/latent_map.png is a folder; pass a file path', naming no flag."""
    out = tmp_path / "pictures"
    (out / "latent_map.png").mkdir(parents=True)
    code, printed, err = _main(capsys, *CHEAP_DEMO, "--out", str(out))
    assert code == 2 and err.startswith("latentspace demo: error: --out: "), err
    assert "latent_map.png is a folder" in err and err.count("\n") == 1, err
    assert "epochs in" not in printed  # nothing was trained
    assert sorted(p.name for p in out.iterdir()) == ["latent_map.png"]  # the user's folder kept


def test_demo_refuses_an_out_too_long_for_its_pictures_before_training(tmp_path, capsys):
    """An --out the file system holds, but not with '/reconstructions.png' (and the temporary
    file's name) after it, failed after the training with 'path too long (4,095 characters;
    ...)', a length the user never typed."""
    name_max, path_max = os.pathconf(tmp_path, "PC_NAME_MAX"), os.pathconf(tmp_path, "PC_PATH_MAX")
    out = str(tmp_path)
    while len(out) < path_max - 1 - 40:
        out = os.path.join(out, "d" * min(name_max, path_max - 1 - 10 - len(out)))
    code, printed, err = _main(capsys, *CHEAP_DEMO, "--out", out)
    assert code == 2 and err.startswith("latentspace demo: error: --out: "), err
    assert "path too long" in err and err.count("\n") == 1, err
    assert "epochs in" not in printed
    assert list(tmp_path.iterdir()) == []  # the folders it made are gone again


def test_demo_refuses_latent_dim_1_before_training(tmp_path, capsys):
    """--latent-dim 1 trained every model, then failed at the first picture with 'Z: a 2-D map
    needs codes of 2 or more dimensions', naming no flag."""
    code, printed, err = _main(capsys, *CHEAP_DEMO, "--latent-dim", "1", "--out", str(tmp_path / "d"))
    assert code == 2, err
    assert err == "latentspace demo: error: --latent-dim: the latent map needs at least 2 dimensions, got 1\n", err
    assert "epochs in" not in printed
    assert not (tmp_path / "d").exists()


def test_demo_refuses_an_empty_out(tmp_path, capsys, monkeypatch):
    """--out '' (an unset shell variable) wrote the five pictures into the current folder,
    over any of the user's files of those names."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "latent_map.png").write_bytes(b"mine")
    code, printed, err = _main(capsys, *CHEAP_DEMO, "--out", "")
    assert code == 2 and err == "latentspace demo: error: --out: empty; expected a folder's path\n", err
    assert "epochs in" not in printed
    assert (tmp_path / "latent_map.png").read_bytes() == b"mine"


def _blocked_matplotlib(tmp_path) -> str:
    """A folder to put first on PYTHONPATH, whose matplotlib package fails to import."""
    package = tmp_path / "blocked" / "matplotlib"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    return str(tmp_path / "blocked")


def test_demo_without_matplotlib_fails_before_training(tmp_path):
    """Without matplotlib the demo trained its models (about 20 s by default) and only then
    said 'latentspace.plots needs matplotlib'."""
    result = _cli(*CHEAP_DEMO, "--out", str(tmp_path / "d"), env={"PYTHONPATH": _blocked_matplotlib(tmp_path)})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("latentspace demo: error: latentspace.plots needs matplotlib"), result.stderr
    assert "epochs in" not in result.stdout and "Traceback" not in result.stderr
    assert not (tmp_path / "d").exists()


def test_demo_with_a_bad_mplbackend_names_it_before_training(tmp_path):
    """MPLBACKEND=bogus (which the Agg pictures never use) made `import matplotlib` fail after
    the training with "Key backend: 'bogus' is not a valid value for backend", naming neither
    the variable nor a way out."""
    result = _cli(*CHEAP_DEMO, "--out", str(tmp_path / "d"), env={"MPLBACKEND": "bogus"})
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("latentspace demo: error: MPLBACKEND: 'bogus' is not a matplotlib backend"), \
        result.stderr
    assert "unset MPLBACKEND" in result.stderr and result.stderr.count("\n") == 1, result.stderr
    assert "epochs in" not in result.stdout


# ---------------------------------------------------------------------------------------
# latentspace.plots: pictures of bounded size


@pytest.fixture(scope="module")
def pca():
    x, _ = ls.datasets.load_digits()
    return ls.PCA(4).fit(x[:300])


def test_an_interpolation_of_too_many_steps_is_refused_by_name(tmp_path, pca):
    """`latentspace plot interpolation --steps 100000` ran for minutes on its way to a PNG
    11 million pixels wide (700 steps: 13 s, a 77,000-pixel-wide picture)."""
    x, _ = ls.datasets.load_digits()
    with pytest.raises(ValueError, match=r"^steps: 100000 steps make 100,002 images; at most 2,000 fit in one "
                                         r"picture: pass steps=1998 or less$"):
        plots.plot_interpolation(pca, x[0], x[1], tmp_path / "i.png", steps=100000)
    assert not (tmp_path / "i.png").exists()


def test_too_many_reconstructions_are_refused_by_name(tmp_path, pca):
    x = np.tile(ls.datasets.load_digits()[0], (2, 1))  # 3,594 rows
    with pytest.raises(ValueError, match=r"^n: 1,001 samples over their reconstructions make 2,002 images; at most "
                                         r"2,000 fit in one picture: pass n=1000 or less$"):
        plots.plot_reconstructions(pca, x, tmp_path / "r.png", n=1001)
    assert not (tmp_path / "r.png").exists()


def test_too_many_neighbour_images_are_refused_by_name(tmp_path, pca, capsys):
    x, _ = ls.datasets.load_digits()
    with pytest.raises(ValueError, match=r"^queries: 250 queries with k=8 neighbours make 2,250 images; at most "
                                         r"2,000 fit in one picture: pass at most 222 queries at k=8$"):
        plots.plot_neighbors(pca, x, list(range(250)), tmp_path / "n.png", k=8)
    # the command line names its flags
    ls.save_model(pca, tmp_path / "pca.safetensors")
    code, _, err = _main(capsys, "plot", "neighbors", str(tmp_path / "pca.safetensors"), "digits",
                         "--queries", ",".join(map(str, range(250))), "--out", str(tmp_path / "n.png"))
    assert code == 2 and err == ("latentspace plot: error: --queries: 250 queries with -k 8 neighbours make 2,250 "
                                 "images; at most 2,000 fit in one picture: pass at most 222 queries at -k 8\n"), err
    assert not (tmp_path / "n.png").exists()


# ---------------------------------------------------------------------------------------
# A folder name that is no UTF-8 (a Latin-1 name), printed to a strict stdout


def test_demo_prints_a_folder_name_that_is_no_text(tmp_path):
    """A stdout that refuses what is not UTF-8 (PYTHONIOENCODING=utf-8:strict, or a locale
    such as en_US.UTF-8) failed on the last line, after the pictures were written, with
    "'utf-8' codec can't encode character '\\udcff'" and exit status 2."""
    out = os.path.join(os.fsencode(tmp_path), b"pictures-\xff")
    result = _cli(*CHEAP_DEMO, "--out", out, env={"PYTHONIOENCODING": "utf-8:strict"})
    assert result.returncode == 0, result.stderr
    assert f"pictures: 5 PNG files in {tmp_path.resolve()}/pictures-\\xff: latent_map.png" in result.stdout
    assert sorted(os.listdir(out)) == sorted(os.fsencode(name) for name in PICTURES)


def test_plot_prints_a_file_name_that_is_no_text(tmp_path, pca):
    ls.save_model(pca, tmp_path / "pca.safetensors")
    out = os.path.join(os.fsencode(tmp_path), b"map-\xff.png")
    result = _cli("plot", "map", str(tmp_path / "pca.safetensors"), "digits", "--out", out,
                  env={"PYTHONIOENCODING": "utf-8:strict"})
    assert result.returncode == 0, result.stderr
    assert f"latentspace plot map: {tmp_path}/map-\\xff.png (1,797 codes of the scikit-learn digits" in result.stdout
    assert os.path.getsize(out) > 5000


def test_plot_relevance_kl_of_no_vae_names_the_model_file(tmp_path, pca, capsys):
    """'error: model: method='kl' needs a VAE ...' named the API's parameter, which the
    command line has none of (its MODEL is a file)."""
    ls.save_model(pca, tmp_path / "pca.safetensors")
    code, _, err = _main(capsys, "plot", "relevance", str(tmp_path / "pca.safetensors"), "digits", "--method", "kl",
                         "--out", str(tmp_path / "r.png"))
    assert code == 2, err
    assert err.startswith(f"latentspace plot: error: {tmp_path / 'pca.safetensors'}: --method 'kl' needs a VAE"), err
    assert not (tmp_path / "r.png").exists()


@pytest.mark.parametrize("models,unknown", [(" vae , VAE", "'VAE'"), ("vae,pca", "'pca' (PCA is always measured)"),
                                            ("gan,,vea", "'gan', 'vea'")])
def test_demo_models_names_the_items_it_does_not_know(capsys, models, unknown):
    """'--models: expected ..., got ' vae , VAE'' left the user to find which item was wrong,
    and 'pca' (a model of `latentspace train`) was refused with no word that the demo runs it."""
    code, _, err = _main(capsys, "demo", "--models", models)
    assert code == 2
    assert err == ("latentspace demo: error: --models: expected a comma-separated list of vae, autoencoder, conv, "
                   f"got {models!r}: unknown {unknown}\n"), err
