"""Pictures (latentspace.plots): each writes a valid PNG of the expected pixel size,
atomically, without pyplot; bad shapes, labels and paths raise errors naming the argument."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("matplotlib")

import latentspace as ls  # noqa: E402
from latentspace import plots  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_size(path) -> tuple[int, int]:
    """(width, height) from a PNG's header, after checking its signature and that its image
    data is there."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, "not a PNG file"
    assert data[12:16] == b"IHDR" and b"IDAT" in data and data.rstrip(b"\x00").endswith(b"IEND\xaeB`\x82")
    width, height = struct.unpack(">II", data[16:24])
    assert len(data) > 2000, f"suspiciously small PNG: {len(data)} bytes"
    return width, height


@pytest.fixture(scope="module")
def digits():
    x, y = ls.datasets.load_digits()
    return x[:300], y[:300]


@pytest.fixture(scope="module")
def pca(digits):
    return ls.PCA(6).fit(digits[0])


# ---------------------------------------------------------------------------------------
# The latent map


def test_latent_map_pca(tmp_path, digits, pca):
    x, y = digits
    out = plots.plot_latent_map(pca.encode(x), y, tmp_path / "map.png", method="pca")
    assert out == tmp_path / "map.png"
    assert _png_size(out) == (700, 600)
    # torch in, string path, no labels, many classes (a colour bar instead of a legend)
    assert _png_size(plots.plot_latent_map(torch.from_numpy(pca.encode(x)), None, str(tmp_path / "a.png"),
                                           method="pca")) == (700, 600)
    assert _png_size(plots.plot_latent_map(pca.encode(x), np.arange(300) % 37, tmp_path / "b.png",
                                           method="pca")) == (700, 600)
    assert _png_size(plots.plot_latent_map(pca.encode(x)[:, :2], y, tmp_path / "c.png")) == (700, 600)  # 2-d as is
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png", "c.png", "map.png"]  # no temporaries


def test_latent_map_projection_is_pca_by_default_without_umap(tmp_path, digits, pca, monkeypatch):
    monkeypatch.setattr(plots, "_umap_installed", lambda: False)
    z = pca.encode(digits[0])
    plots.plot_latent_map(z, digits[1], tmp_path / "auto.png")
    plots.plot_latent_map(z, digits[1], tmp_path / "pca.png", method="pca")
    assert (tmp_path / "auto.png").read_bytes() == (tmp_path / "pca.png").read_bytes()


def test_latent_map_umap(tmp_path, digits, pca):
    z = pca.encode(digits[0])
    if plots._umap_class() is None:
        with pytest.raises(ImportError, match="method: 'umap' needs umap-learn: pip install umap-learn"):
            plots.plot_latent_map(z, digits[1], tmp_path / "u.png", method="umap")
        assert not (tmp_path / "u.png").exists()
        return
    assert _png_size(plots.plot_latent_map(z, digits[1], tmp_path / "u.png", method="umap")) == (700, 600)


def test_latent_map_errors(tmp_path, digits, pca):
    z = pca.encode(digits[0])
    with pytest.raises(ValueError, match="path: expected a file name ending in .png"):
        plots.plot_latent_map(z, digits[1], tmp_path / "map.jpg")
    with pytest.raises(ValueError, match="method: expected 'auto', 'pca' or 'umap'"):
        plots.plot_latent_map(z, digits[1], tmp_path / "m.png", method="tsne")
    with pytest.raises(ValueError, match=r"y: expected shape \(300,\) \(one label per row\)"):
        plots.plot_latent_map(z, digits[1][:10], tmp_path / "m.png")
    with pytest.raises(ValueError, match="Z: a 2-D map needs codes of 2 or more dimensions"):
        plots.plot_latent_map(z[:, :1], digits[1], tmp_path / "m.png")
    with pytest.raises(ValueError, match="Z: expected a 2-d array"):
        plots.plot_latent_map(z[0], None, tmp_path / "m.png")
    bad = z.copy()
    bad[7, 0] = np.nan
    with pytest.raises(ValueError, match="Z: row 7 contains NaN or Inf"):
        plots.plot_latent_map(bad, None, tmp_path / "m.png")
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(IsADirectoryError):
        plots.plot_latent_map(z, None, tmp_path / "folder.png", method="pca")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.png"]


# ---------------------------------------------------------------------------------------
# Reconstructions, interpolation, neighbours


def test_reconstructions(tmp_path, digits, pca):
    x = digits[0]
    assert _png_size(plots.plot_reconstructions(pca, x, tmp_path / "r.png")) == (1100, 270)
    assert _png_size(plots.plot_reconstructions(pca, x[:3], tmp_path / "r3.png", n=10)) == (400, 270)  # all 3
    assert _png_size(plots.plot_reconstructions(pca, x.reshape(-1, 8, 8), tmp_path / "img.png", n=4)) == (440, 270)
    torch.manual_seed(0)
    conv = ls.ConvAutoencoder((1, 8, 8), 2, channels=(4,))
    assert _png_size(plots.plot_reconstructions(conv, torch.from_numpy(x), tmp_path / "c.png", n=2)) == (400, 270)


def test_reconstructions_image_shape(tmp_path, rng):
    torch.manual_seed(0)
    model = ls.Autoencoder(100, 3, hidden=(8,))
    x = rng.random((5, 100)).astype(np.float32)
    with pytest.raises(ValueError, match=r"image_shape: cannot tell how a sample of shape \(100,\) makes an image; "
                                         r"pass image_shape=\(H, W\)"):
        plots.plot_reconstructions(model, x, tmp_path / "r.png")
    assert _png_size(plots.plot_reconstructions(model, x, tmp_path / "r.png", image_shape=(10, 10))) == (550, 270)
    assert _png_size(plots.plot_reconstructions(model, x.reshape(5, 10, 10), tmp_path / "s.png")) == (550, 270)
    with pytest.raises(ValueError, match=r"image_shape: \(3, 5\) holds 15 values, but each sample has 100"):
        plots.plot_reconstructions(model, x, tmp_path / "r.png", image_shape=(3, 5))
    with pytest.raises(ValueError, match=r"image_shape: expected \(H, W\) or \(C, H, W\) with C = 1 or 3"):
        plots.plot_reconstructions(model, x, tmp_path / "r.png", image_shape=(4, 5, 5))
    # colour: (3, H, W)
    colour = ls.Autoencoder(48, 2, hidden=(8,))
    assert _png_size(plots.plot_reconstructions(colour, rng.random((2, 3, 4, 4)), tmp_path / "rgb.png")) == (400, 270)


def test_reconstructions_errors(tmp_path, digits, pca):
    x = digits[0]
    with pytest.raises(ValueError, match=r"X: expected samples of the model's input shape \(64,\) \(64 values each\), "
                                         r"got shape \(10, 63\)"):
        plots.plot_reconstructions(pca, x[:10, :63], tmp_path / "r.png")
    with pytest.raises(TypeError, match="model: expected a latentspace model"):
        plots.plot_reconstructions(object(), x, tmp_path / "r.png")
    with pytest.raises(ValueError, match="n: expected an integer >= 1"):
        plots.plot_reconstructions(pca, x, tmp_path / "r.png", n=0)
    with pytest.raises(ValueError, match="X: expected at least one sample"):
        plots.plot_reconstructions(pca, x[:0], tmp_path / "r.png")
    with pytest.raises(TypeError, match="X: expected a real numeric dtype"):
        plots.plot_reconstructions(pca, x.astype(complex), tmp_path / "r.png")
    assert list(tmp_path.iterdir()) == []


def test_interpolation(tmp_path, digits, pca, single_threaded):
    x = digits[0]
    out = plots.plot_interpolation(pca, x[0], x[1], tmp_path / "i.png", steps=5)
    assert _png_size(out) == (770, 170)
    torch.manual_seed(0)
    vae = ls.VAE(64, 3, hidden=(16,))
    assert _png_size(plots.plot_interpolation(vae, x[:1], torch.from_numpy(x[2]).reshape(8, 8),
                                              tmp_path / "v.png")) == (1320, 170)
    wide = ls.Autoencoder(100, 2, hidden=(8,))  # 10x10 images: the shape of x0 is kept on screen
    assert _png_size(plots.plot_interpolation(wide, np.zeros((10, 10)), np.ones((1, 10, 10)), tmp_path / "w.png",
                                              steps=3)) == (550, 170)
    with pytest.raises(ValueError, match="image_shape: cannot tell how a sample of shape"):
        plots.plot_interpolation(wide, np.zeros(100), np.ones(100), tmp_path / "w.png")
    with pytest.raises(ValueError, match="steps: expected an integer >= 2"):
        plots.plot_interpolation(pca, x[0], x[1], tmp_path / "i.png", steps=1)
    with pytest.raises(ValueError, match=r"x1: expected one sample of the model's input shape \(64,\) \(64 values\), "
                                         r"got shape \(2, 64\)"):
        plots.plot_interpolation(pca, x[0], x[1:3], tmp_path / "i.png")
    with pytest.raises(TypeError, match="x0: expected a real numeric sample"):
        plots.plot_interpolation(pca, np.array(["a"] * 64), x[1], tmp_path / "i.png")


def test_neighbors(tmp_path, digits, pca):
    x, y = digits
    out = plots.plot_neighbors(pca, x, [0, 5, 9], tmp_path / "n.png", k=4, labels=y)
    assert _png_size(out) == (550, 460)
    z = pca.encode(x)
    assert _png_size(plots.plot_neighbors(z, x, 3, tmp_path / "z.png")) == (990, 180)  # codes given, one query
    assert _png_size(plots.plot_neighbors(torch.from_numpy(z), torch.from_numpy(x), np.array([1, 2]),
                                          tmp_path / "t.png", k=2)) == (400, 320)


def test_neighbors_errors(tmp_path, digits, pca):
    x, y = digits
    z = pca.encode(x)
    with pytest.raises(ValueError, match="queries: row 300 is out of range for X's 300 samples"):
        plots.plot_neighbors(z, x, [0, 300], tmp_path / "n.png")
    with pytest.raises(TypeError, match="queries: expected a row number or a 1-d list of them"):
        plots.plot_neighbors(z, x, 1.5, tmp_path / "n.png")
    with pytest.raises(ValueError, match=r"model_or_Z: expected one code per sample of X \(300\)"):
        plots.plot_neighbors(z[:10], x, 0, tmp_path / "n.png")
    with pytest.raises(ValueError, match="k: 5 neighbours besides the query need at least 6 samples, got 5"):
        plots.plot_neighbors(z[:5], x[:5], 0, tmp_path / "n.png", k=5)
    with pytest.raises(ValueError, match=r"labels: expected shape \(300,\)"):
        plots.plot_neighbors(z, x, 0, tmp_path / "n.png", labels=y[:3])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------
# Relevance bars, files, no pyplot


def test_relevance_bars_with_a_dimension_that_separates_the_classes_alone(tmp_path, rng):
    # relevance gives such a dimension +inf (the best score, as docs/similarity.md says); the
    # plot refused it, naming a `scores` that `latentspace plot relevance` users never typed
    y = np.repeat(np.arange(3), 10)
    z = rng.standard_normal((30, 4))
    z[:, 2] = y
    scores = ls.relevance(z, y)
    assert scores[2] == np.inf
    assert _png_size(plots.plot_relevance(scores, tmp_path / "r.png")) == (400, 350)
    heights, infinite = plots._bar_heights(np.array([2.0, np.inf, -1.0, -np.inf]))
    np.testing.assert_array_equal(infinite, [False, True, False, True])
    np.testing.assert_allclose(heights, [2.0, 2.4, -1.0, -1.4])  # a fifth of the reach (2) past the ends
    heights, _ = plots._bar_heights(np.array([np.inf, np.inf]))
    np.testing.assert_allclose(heights, [0.2, 0.2])  # no finite score: a reach of 1


def test_relevance_bars(tmp_path, digits, pca):
    scores = ls.relevance(pca.encode(digits[0]), digits[1])
    assert _png_size(plots.plot_relevance(scores, tmp_path / "r.png")) == (400, 350)
    named = plots.plot_relevance(scores, tmp_path / "named.png", labels=[f"pc{i}" for i in range(6)],
                                 title="Fisher score")
    assert _png_size(named) == (400, 350)
    assert _png_size(plots.plot_relevance(np.linspace(-1, 1, 40), tmp_path / "wide.png")) == (1750, 350)
    with pytest.raises(ValueError, match="labels: expected 6 names .one per score., got 2"):
        plots.plot_relevance(scores, tmp_path / "x.png", labels=["a", "b"])
    with pytest.raises(ValueError, match="scores: dimension 1 has a non-finite score"):
        plots.plot_relevance([1.0, np.nan], tmp_path / "x.png")
    with pytest.raises(ValueError, match="scores: expected a non-empty 1-d array"):
        plots.plot_relevance(np.ones((2, 3)), tmp_path / "x.png")


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    target = tmp_path / "r.png"
    plots.plot_relevance([1.0, 2.0], target)
    before = target.read_bytes()

    def broken(self, *args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        plots.plot_relevance([3.0, 1.0], target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.png"]


def test_no_pyplot_and_matplotlib_loaded_lazily(tmp_path):
    code = ("import sys, latentspace as ls, latentspace.plots; assert 'matplotlib' not in sys.modules; "
            f"ls.plots.plot_relevance([1.0, 2.0], {str(tmp_path / 'r.png')!r}); "
            "assert 'matplotlib.pyplot' not in sys.modules; print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_a_module_named_umap_without_umap_learn_is_not_umap(tmp_path, digits, pca, monkeypatch):
    """The unrelated PyPI package "umap" (or an uninstall's leftovers) has no UMAP class:
    "auto" falls back to PCA and "umap" says what to install, instead of an AttributeError."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "umap", types.ModuleType("umap"))
    assert plots._umap_class() is None and not plots._umap_installed()
    z = pca.encode(digits[0])
    assert plots.plot_latent_map(z, digits[1], tmp_path / "auto.png").exists()
    with pytest.raises(ImportError, match="needs umap-learn"):
        plots.plot_latent_map(z, digits[1], tmp_path / "u.png", method="umap")


# ---------------------------------------------------------------------------------------
# Regressions: errors name the plot function's own arguments; tensors of any float dtype;
# codes of any scale


def test_neighbors_name_their_own_arguments_for_unusable_rows(tmp_path, digits, pca):
    """A NaN code or sample was refused as a row of knn's `queries` or `database`: here
    `queries` are row numbers, and neither is an argument of plot_neighbors."""
    x, _ = digits
    with pytest.raises(ValueError, match="model_or_Z: row 0 contains NaN or Inf"):
        plots.plot_neighbors(np.full((300, 4), np.nan), x, 0, tmp_path / "n.png", k=3)
    z = pca.encode(x)
    z[7] = np.inf
    with pytest.raises(ValueError, match="model_or_Z: row 7 contains NaN or Inf"):
        plots.plot_neighbors(z, x, 1, tmp_path / "n.png", k=3)
    bad = x.copy()
    bad[0, 5] = np.nan
    for query in (0, 1):  # the bad sample as the query, and among the others
        with pytest.raises(ValueError, match="X: row 0 contains NaN or Inf"):
            plots.plot_neighbors(pca, bad, query, tmp_path / "n.png", k=3)
    assert list(tmp_path.iterdir()) == []


def test_interpolation_of_low_precision_tensors(tmp_path, pca):
    """A bfloat16 sample raised torch's "Got unsupported ScalarType BFloat16"."""
    torch.manual_seed(0)
    x0, x1 = torch.rand(64), torch.rand(64)
    out = plots.plot_interpolation(pca, x0.bfloat16(), x1, tmp_path / "b.png", steps=3)
    assert _png_size(out) == (550, 170)
    assert _png_size(plots.plot_interpolation(pca, x0.half(), x1.bfloat16().reshape(8, 8), tmp_path / "h.png",
                                              steps=3)) == (550, 170)
    with pytest.raises(TypeError, match="x0: expected a real numeric dtype"):
        plots.plot_interpolation(pca, x0 > 0.5, x1, tmp_path / "x.png")
    with pytest.raises(TypeError, match="x1: expected a real numeric dtype"):
        plots.plot_interpolation(pca, x0, torch.complex(x1, x1), tmp_path / "x.png")


@pytest.mark.parametrize("scale", [1e200, 1e-200])
def test_pca_map_of_codes_of_any_scale(tmp_path, scale):
    """Codes near 1e200 gave "PC1 (nan% of the variance)" and overflow warnings (their
    squared singular values overflow); near 1e-200 they underflow to 0 (0%)."""
    import warnings

    z = np.random.default_rng(0).standard_normal((50, 3)) * [3.0, 2.0, 1.0]
    xy, ratio = plots._pca_2d(z)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scaled_xy, scaled_ratio = plots._pca_2d(z * scale)
        assert _png_size(plots.plot_latent_map(z * scale, None, tmp_path / "m.png", method="pca")) == (700, 600)
    np.testing.assert_allclose(scaled_ratio, ratio, rtol=1e-12)
    np.testing.assert_allclose(scaled_xy / scale, xy, rtol=1e-9, atol=1e-12)
    assert 0.5 < ratio[0] < 1.0 and 0.0 < ratio[1] < ratio[0]


def test_reconstructions_and_interpolation_refuse_nan_samples(tmp_path, digits, pca):
    """A NaN or Inf sample went through the model and was drawn as a blank reconstruction or
    a blank strip (all-NaN samples with a RuntimeWarning and no display range), where
    plot_neighbors refuses it by name: a sample the model cannot encode is refused here too."""
    import warnings

    x, _ = digits
    bad = x[:5].copy()
    bad[3, 10] = np.nan
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValueError, match="X: row 3 contains NaN or Inf"):
            plots.plot_reconstructions(pca, bad, tmp_path / "r.png")
        with pytest.raises(ValueError, match="X: row 0 contains NaN or Inf"):
            plots.plot_reconstructions(pca, np.full((2, 64), np.nan, np.float32), tmp_path / "r.png")
        with pytest.raises(ValueError, match="x0: contains NaN or Inf"):
            plots.plot_interpolation(pca, bad[3], x[0], tmp_path / "i.png")
        with pytest.raises(ValueError, match="x1: contains NaN or Inf"):
            plots.plot_interpolation(pca, x[0], np.full(64, np.inf), tmp_path / "i.png")
    # a NaN past the first n samples is never read, let alone drawn
    assert _png_size(plots.plot_reconstructions(pca, np.concatenate([x[:3], bad]), tmp_path / "r.png", n=3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.png"]


@pytest.fixture
def figures_made(monkeypatch):
    """The Figures the plot functions make, in order (plots._figure spied on)."""
    made = []
    real = plots._figure

    def spy(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(plots, "_figure", spy)
    return made


def test_large_grids_are_not_laid_out_by_the_constraint_solver(tmp_path, digits, pca, figures_made):
    """Constrained layout's time grows much faster than the grid (kiwisolver): 160
    reconstructions (320 images) took 21 s, 700 ran for over 15 minutes without an end
    (`latentspace plot reconstructions -n 700`). Grids past _CONSTRAINED_LAYOUT_AXES
    images use tight layout (5 s for 320 images), small ones keep their look."""
    x, _ = digits
    made = figures_made
    plots.plot_interpolation(pca, x[0], x[1], tmp_path / "small.png", steps=10)
    plots.plot_interpolation(pca, x[0], x[1], tmp_path / "large.png", steps=plots._CONSTRAINED_LAYOUT_AXES)
    assert [type(f.get_layout_engine()).__name__ for f in made] == ["ConstrainedLayoutEngine", "TightLayoutEngine"]
    assert _png_size(tmp_path / "large.png")[0] == 110 * (plots._CONSTRAINED_LAYOUT_AXES + 2)


def test_a_tall_grid_under_tight_layout_keeps_its_title_clear_of_the_images(tmp_path, digits, pca, figures_made):
    """Tight layout makes room for the suptitle's height but does not move it, and
    suptitle's default place, 2% of the figure's height below its top, is lower than that
    room in a tall figure: 12 queries' neighbours (108 images, 17 inches) had the title
    written over the first row's captions. Constrained layout moved it up by itself."""
    x, y = digits
    made = figures_made
    for queries, engine in ((11, "ConstrainedLayoutEngine"), (12, "TightLayoutEngine")):  # 99, 108 images
        plots.plot_neighbors(pca, x, list(range(queries)), tmp_path / f"n{queries}.png", k=8, labels=y)
        figure = made[-1]
        assert type(figure.get_layout_engine()).__name__ == engine
        renderer = figure.canvas.get_renderer()  # as laid out when it was saved
        title = figure._suptitle.get_window_extent(renderer)
        for axes in figure.axes:
            assert not title.overlaps(axes.title.get_window_extent(renderer)), axes.get_title()
            assert not title.overlaps(axes.get_window_extent(renderer))


@pytest.mark.parametrize("dims", [2, 8, 40])
def test_a_long_relevance_title_stays_inside_the_picture(tmp_path, monkeypatch, dims):
    """`latentspace plot relevance --method kl` titles the bars "mean KL(q(z|x) || N(0, 1)) per
    latent dimension (nats)": on an 8-dimension picture its end ran past the right edge."""
    drawn = {}
    save = plots._save

    def keep(figure, path):
        drawn["figure"] = figure
        return save(figure, path)

    monkeypatch.setattr(plots, "_save", keep)
    title = "mean KL(q(z|x) || N(0, 1)) per latent dimension (nats)"
    plots.plot_relevance(np.linspace(0.1, 2.0, dims), tmp_path / "r.png", title=title)
    figure = drawn["figure"]
    renderer = figure.canvas.get_renderer()
    box = figure.axes[0].title.get_window_extent(renderer)
    assert 0 <= box.x0 and box.x1 <= figure.bbox.x1 and box.y1 <= figure.bbox.y1, (box, figure.bbox)
    assert " ".join(figure.axes[0].get_title().split()) == title  # the words all there, maybe on two lines


def test_relevance_of_thousands_of_dimensions_stays_a_picture_of_bounded_width(tmp_path):
    """A bar of 0.4 inch each: 5,000 dimensions (a wide embedding) made a 200,150-pixel-wide PNG
    in 22 s, and 20,000 one too large for most viewers to open."""
    scores = np.linspace(0.0, 1.0, 5000)
    names = [f"d{j}" for j in range(5000)]
    assert _png_size(plots.plot_relevance(scores, tmp_path / "r.png", labels=names)) == (4000, 350)
    assert _png_size(plots.plot_relevance(scores[:96], tmp_path / "s.png")) == (3990, 350)  # below it: as before


@pytest.mark.parametrize("title", [5, b"bytes", ["a list"]])
def test_a_relevance_title_that_is_no_string_is_refused_by_name(tmp_path, title):
    """An int title raised AttributeError: 'int' object has no attribute 'expandtabs'."""
    with pytest.raises(TypeError, match=r"^title: expected a string \(or None\), got "):
        plots.plot_relevance([1.0, 2.0], tmp_path / "r.png", title=title)
    assert not (tmp_path / "r.png").exists()
