"""Pictures of a latent space, written as PNG files (matplotlib, a dependency of latentspace).

    plot_latent_map(Z, y, path)                       2-D map of the codes, coloured by label
    plot_reconstructions(model, X, path)              originals over their reconstructions
    plot_interpolation(model, x0, x1, path)           decoded points on the line from x0's code to x1's
    plot_neighbors(model_or_Z, X, queries, path)      query images and their k nearest in latent space
    plot_relevance(scores, path)                      a bar per latent dimension

Each draws on its own matplotlib Figure with the Agg canvas (no pyplot, so no window opens
and the caller's pyplot backend and state are left alone), writes the PNG atomically (a
temporary file beside `path`, renamed over it) and returns `path` as a pathlib.Path.
matplotlib is imported on the first call, so this module imports without it.

Images: a sample of shape (H, W), (1, H, W) or (3, H, W) is drawn as it is; flat rows of 64
or 784 values are drawn as 8x8 or 28x28 (the digits, MNIST); any other flat size needs
image_shape=(H, W) (or (C, H, W), C = 1 or 3). A grid holds at most 2,000 images (n, steps, or
queries times k + 1): more are refused, naming the argument, before any is drawn.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from ._arrays import (
    as_float64_matrix,
    as_labels,
    as_matrix,
    as_scores,
    check_int,
    check_k,
    check_real_dtype,
    check_rows,
    check_rows_usable,
    is_torch_tensor,
    rows_as_float32,
)
from ._atomic import atomic_path

__all__ = ["plot_interpolation", "plot_latent_map", "plot_neighbors", "plot_reconstructions", "plot_relevance"]

_DPI = 100
_CELL_INCHES = 1.1  # one image in a grid
_MIN_WIDTH_INCHES = 4.0  # room for the title above a short grid
_KNOWN_IMAGE_SHAPES = {64: (8, 8), 784: (28, 28)}
_MAX_LEGEND_CLASSES = 20  # more classes get a colour bar instead of a legend
# plot_relevance: a bar takes 0.4 inch up to this width (96 bars); more bars share it, and
# only every so many is named (5,000 dimensions made a 200,000-pixel-wide picture in 22 s).
_BAR_INCHES = 0.4
_MAX_RELEVANCE_INCHES = 40.0
_MAX_NAMED_BARS = 96
# Grids of more images are laid out by tight layout: constrained layout's solver grows much
# faster than the grid (320 images took 21 s against 5 s, 1,400 over 15 minutes), and
# below this its cost is small (80 images: 1.9 s in all).
_CONSTRAINED_LAYOUT_AXES = 100
# The most images one picture draws: their time and memory grow with their count (700
# interpolation steps took 13 s and made a 77,000-pixel-wide PNG; 100,000 ran for minutes
# towards 11 million pixels), and past a few hundred no one sees them one by one.
_MAX_IMAGES = 2000
MAP_METHODS = ("auto", "pca", "umap")


# ---------------------------------------------------------------------------------------
# Figures and files


def _check_path(path: Any) -> Path:
    if isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(".png"):
        return Path(os.fspath(path))
    raise ValueError(f"path: expected a file name ending in .png, got {path!r}")


def _require_matplotlib() -> None:
    """Imports what the pictures draw with, or raises what each picture would: ImportError
    when matplotlib is missing, ValueError naming MPLBACKEND when it holds no backend
    (matplotlib then refuses to import, though these pictures use none; its own message
    named neither the variable nor a way out). `latentspace demo` calls it before training."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise ImportError("latentspace.plots needs matplotlib: reinstall latentspace "
                          "(or pip install matplotlib)") from None
    except ValueError:
        backend = os.environ.get("MPLBACKEND")
        if not backend:
            raise
        raise ValueError(f"MPLBACKEND: {backend!r} is not a matplotlib backend, and matplotlib does not import "
                         "with it; unset MPLBACKEND (these pictures need no backend) or set it to one "
                         "such as agg") from None


def _figure(width: float, height: float, axes: int = 1):
    """A Figure on the Agg canvas, outside pyplot, for `axes` plots (images of a grid)."""
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layout = "constrained" if axes <= _CONSTRAINED_LAYOUT_AXES else "tight"
    figure = Figure(figsize=(width, height), dpi=_DPI, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def _suptitle(figure: Any, text: str) -> None:
    """The figure's title. Constrained layout moves it to the top itself; tight layout makes
    room for its height at the top but leaves it where suptitle puts it, 2% of the figure's
    height down: in a tall grid (17 inches) that is below the room, over the first row's
    captions. So under tight layout it is put at the top, its layout pad below the edge."""
    from matplotlib import rcParams
    from matplotlib.layout_engine import TightLayoutEngine

    engine = figure.get_layout_engine()
    if not isinstance(engine, TightLayoutEngine):
        figure.suptitle(text, fontsize=10)
        return
    pad_inches = engine.get()["pad"] * float(rcParams["font.size"]) / 72  # as tight layout measures it
    figure.suptitle(text, fontsize=10, y=1 - pad_inches / figure.get_figheight())


def _fitted(title: str, figure: Any) -> str:
    """An axes title broken into lines that fit the figure's width: layouts make room for a
    title's height, not its width (a long one, as `latentspace plot relevance --method kl`
    gives, ran past the picture's edge). Characters of the default 12 pt title are taken as
    0.6 of its size wide, on the safe side for the default font."""
    import textwrap

    from matplotlib import rcParams

    size = rcParams["axes.titlesize"]
    points = float(size) if isinstance(size, (int, float)) else 1.2 * float(rcParams["font.size"])  # "large"
    characters = max(16, int(figure.get_figwidth() * 72 / (0.6 * points)) - 4)
    return textwrap.fill(title, characters, break_long_words=False)


def _save(figure: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:  # the temporary name has no .png suffix: say the format
        figure.savefig(tmp, format="png", dpi=_DPI)
    return path


# ---------------------------------------------------------------------------------------
# Samples as images


def _rows(x: Any, name: str, limit: int | None = None) -> np.ndarray:
    """Samples (n, ...), or the first `limit` of them, as float32 numpy (numpy or torch in;
    only the rows kept are converted, so a large memory map is not read whole)."""
    if not isinstance(x, np.ndarray) and not is_torch_tensor(x):
        x = np.asarray(x)
    check_rows(x, name, None)
    return rows_as_float32(x if limit is None else x[:limit])


def _image_shape(image_shape: Any, *sample_shapes: tuple[int, ...]) -> tuple[int, ...]:
    """(H, W) or (C, H, W) to draw one sample: image_shape when given, else the first of
    `sample_shapes` (the data's, then the model's) that is already an image, else a known
    flat size."""
    size = math.prod(sample_shapes[0])
    if image_shape is not None:
        if isinstance(image_shape, (str, bytes)) or not hasattr(image_shape, "__len__"):
            raise TypeError(f"image_shape: expected (H, W) or (C, H, W), got {image_shape!r}")
        shape = tuple(check_int(v, f"image_shape[{i}]") for i, v in enumerate(image_shape))
        if len(shape) not in (2, 3) or (len(shape) == 3 and shape[0] not in (1, 3)):
            raise ValueError(f"image_shape: expected (H, W) or (C, H, W) with C = 1 or 3, got {shape}")
        if math.prod(shape) != size:
            raise ValueError(f"image_shape: {shape} holds {math.prod(shape)} values, but each sample has {size}")
        return shape
    for shape in sample_shapes:
        if len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3)):
            return tuple(shape)
    if size in _KNOWN_IMAGE_SHAPES:
        return _KNOWN_IMAGE_SHAPES[size]
    raise ValueError(f"image_shape: cannot tell how a sample of shape {tuple(sample_shapes[0])} makes an image; "
                     "pass image_shape=(H, W) (or (C, H, W))")


def _as_images(batch: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(m, ...) samples -> (m, H, W) grey or (m, H, W, 3) colour images."""
    images = np.asarray(batch, dtype=np.float32).reshape(batch.shape[0], *shape)
    if len(shape) == 3:
        images = images[:, 0] if shape[0] == 1 else images.transpose(0, 2, 3, 1)
    return images


def _check_image_count(count: int, name: str, what: str, remedy: str) -> None:
    """Refuses a grid of more than _MAX_IMAGES images before it is laid out, naming `name`,
    the argument that asked for them: "{name}: {what} make {count} images; ...: {remedy}"."""
    if count > _MAX_IMAGES:
        raise ValueError(f"{name}: {what} make {count:,} images; at most {_MAX_IMAGES:,} fit in one picture: {remedy}")


def _draw(ax: Any, image: np.ndarray, low: float, high: float, caption: str | None = None) -> None:
    if image.ndim == 3:  # colour: imshow takes RGB in [0, 1]
        image = np.clip((image - low) / max(high - low, 1e-12), 0.0, 1.0)
        ax.imshow(image, interpolation="nearest")
    else:
        ax.imshow(image, cmap="gray_r", vmin=low, vmax=high, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if caption:
        ax.set_title(caption, fontsize=8)


def _display_range(images: np.ndarray) -> tuple[float, float]:
    low, high = float(np.nanmin(images)), float(np.nanmax(images))
    return (low, high) if high > low else (low, low + 1.0)


def _is_model(model: Any) -> bool:
    return callable(getattr(model, "encode", None)) and callable(getattr(model, "decode", None)) \
        and bool(getattr(model, "input_shape", None))


def _input_shape(model: Any) -> tuple[int, ...]:
    if not _is_model(model):
        raise TypeError("model: expected a latentspace model (encode, decode, input_shape), "
                        f"got {type(model).__name__}")
    return tuple(model.input_shape)


def _model_rows(model: Any, x: np.ndarray, name: str) -> np.ndarray:
    """Samples shaped for the model: (m, *model.input_shape), a view when only the shape
    differs (flat rows for a ConvAutoencoder, (n, H, W) images for an MLP)."""
    shape = _input_shape(model)
    if math.prod(x.shape[1:]) != math.prod(shape):
        raise ValueError(f"{name}: expected samples of the model's input shape {shape} "
                         f"({math.prod(shape)} values each), got shape {tuple(x.shape)}")
    return x.reshape(x.shape[0], *shape)


# ---------------------------------------------------------------------------------------
# The pictures


def plot_latent_map(Z: Any, y: Any, path: str | os.PathLike, *, method: str = "auto") -> Path:
    """A scatter plot of the codes Z, (n, d), projected to 2-D and coloured by the labels y,
    (n,) integers (None: one colour).

    method: "pca" (the top two principal components, each axis labelled with its share of
    the variance), "umap" (umap-learn's UMAP, random_state=0; pip install umap-learn), or
    "auto" (default: UMAP when umap-learn is installed, else PCA). Codes with d = 2 are drawn
    on their own axes unless method="umap".
    """
    path = _check_path(path)
    if not isinstance(method, str) or method not in MAP_METHODS:
        raise ValueError(f"method: expected 'auto', 'pca' or 'umap', got {method!r}")
    z = as_float64_matrix(Z, "Z")
    n, d = z.shape
    if d < 2:
        raise ValueError(f"Z: a 2-D map needs codes of 2 or more dimensions, got shape {z.shape}")
    if n < 3:
        raise ValueError(f"Z: a map needs at least 3 rows, got {n}")
    labels = None if y is None else as_labels(y, "y", n)
    if method == "auto":
        method = "umap" if _umap_installed() else "pca"
    if method == "umap":
        xy, axes = _umap(z), ("UMAP 1", "UMAP 2")
        title = f"{n:,} codes ({d} dims), UMAP"
    elif d == 2:
        xy, axes, title = z, ("z0", "z1"), f"{n:,} codes (2 dims)"
    else:
        xy, ratio = _pca_2d(z)
        axes = (f"PC1 ({ratio[0]:.0%} of the variance)", f"PC2 ({ratio[1]:.0%})")
        title = f"{n:,} codes ({d} dims), PCA"

    figure = _figure(7.0, 6.0)
    ax = figure.add_subplot()
    size = float(np.clip(12000.0 / n, 3.0, 30.0))  # smaller dots as the points crowd
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, color="tab:blue", alpha=0.7, linewidths=0)
    else:
        classes = np.unique(labels)
        if classes.size <= _MAX_LEGEND_CLASSES:
            palette = _colours(figure, classes.size)
            for colour, label in zip(palette, classes):
                rows = labels == label
                ax.scatter(xy[rows, 0], xy[rows, 1], s=size, color=colour, alpha=0.8, linewidths=0, label=str(label))
            ax.legend(title="label", markerscale=max(1.0, 30.0 / size) ** 0.5, fontsize=8, loc="best")
        else:
            points = ax.scatter(xy[:, 0], xy[:, 1], s=size, c=labels, cmap="viridis", alpha=0.8, linewidths=0)
            figure.colorbar(points, ax=ax, label="label")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title(title)
    return _save(figure, path)


def _colours(figure: Any, count: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(i) for i in range(count)]


def _umap_class():
    """umap-learn's UMAP, or None when it is not installed. A module named umap without it
    (the unrelated PyPI package "umap", or an uninstall's leftovers) counts as not installed."""
    try:
        import umap
    except ImportError:
        return None
    return getattr(umap, "UMAP", None)


def _umap_installed() -> bool:
    return _umap_class() is not None


def _umap(z: np.ndarray) -> np.ndarray:
    umap_class = _umap_class()
    if umap_class is None:
        raise ImportError("method: 'umap' needs umap-learn: pip install umap-learn (or use method='pca')")
    reducer = umap_class(n_components=2, n_neighbors=min(15, z.shape[0] - 1), random_state=0)
    return np.asarray(reducer.fit_transform(z), dtype=np.float64)


def _pca_2d(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The codes on their top two principal axes (signs fixed: each axis's largest loading
    positive, so the picture is the same run to run), and those axes' shares of the variance.

    Computed on z / max|z| and scaled back: squared singular values of codes near 1e200
    overflow float64 (nan shares), and of codes near 1e-200 underflow to 0; the shares are
    scale-free and the axes the same."""
    scale = float(np.abs(z).max())
    scale = scale if scale > 0 else 1.0  # all-zero codes: no variance, nothing to scale
    centred = z / scale
    centred -= centred.mean(axis=0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2]
    signs = np.sign(axes[np.arange(2), np.abs(axes).argmax(axis=1)])
    axes = axes * np.where(signs == 0, 1.0, signs)[:, None]
    variance = singular**2
    ratio = variance[:2] / variance.sum() if variance.sum() > 0 else np.zeros(2)
    return (centred @ axes.T) * scale, ratio


def plot_reconstructions(model: Any, X: Any, path: str | os.PathLike, n: int = 10,
                         image_shape: Any = None) -> Path:
    """The first n samples of X (all when fewer) in the top row, model(X) below them.

    model: a latentspace model (PCA, Autoencoder, VAE, ConvAutoencoder). X: samples in the
    model's input shape, or flat rows / images of the same size. Both rows share one grey
    scale (the originals' range).
    """
    path = _check_path(path)
    n = check_int(n, "n")
    x = _rows(X, "X", limit=n)
    if x.shape[0] < 1:
        raise ValueError("X: expected at least one sample, got none")
    _check_image_count(2 * x.shape[0], "n", f"{x.shape[0]:,} samples over their reconstructions",
                       f"pass n={_MAX_IMAGES // 2} or less")
    _check_finite_rows(x, "X")  # else drawn as a blank reconstruction (as plot_neighbors refuses it)
    recon = np.asarray(model(_model_rows(model, x, "X")))
    shape = _image_shape(image_shape, tuple(x.shape[1:]), _input_shape(model))
    originals, rebuilt = _as_images(x, shape), _as_images(recon, shape)
    low, high = _display_range(originals)
    m = x.shape[0]
    figure = _figure(max(_MIN_WIDTH_INCHES, _CELL_INCHES * m), 2 * _CELL_INCHES + 0.5, axes=2 * m)
    grid = figure.subplots(2, m, squeeze=False)
    for j in range(m):
        _draw(grid[0, j], originals[j], low, high)
        _draw(grid[1, j], rebuilt[j], low, high)
    grid[0, 0].set_ylabel("original", fontsize=8)
    grid[1, 0].set_ylabel("reconstruction", fontsize=8)
    _suptitle(figure, f"{type(model).__name__}: originals and reconstructions")
    return _save(figure, path)


def _one_sample(x: Any, name: str, model: Any) -> np.ndarray:
    """One sample (its own shape, or with a leading 1) as (1, *model.input_shape)."""
    if is_torch_tensor(x):
        check_real_dtype(x, name)  # bool, complex, sparse or meta tensors: refused naming x0 / x1
        # float32, what is drawn and encoded: a bfloat16 tensor has no numpy twin to convert
        array = x.detach().to("cpu").float().numpy()
    else:
        array = np.asarray(x)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name}: expected a real numeric sample, got dtype {array.dtype}")
    shape = _input_shape(model)
    if array.size != math.prod(shape) or array.ndim == 0:
        raise ValueError(f"{name}: expected one sample of the model's input shape {shape} "
                         f"({math.prod(shape)} values), got shape {array.shape}")
    if not np.isfinite(array).all():  # its code would be NaN, and the strip blank
        raise ValueError(f"{name}: contains NaN or Inf; clean the sample first")
    return np.ascontiguousarray(array, dtype=np.float32).reshape(1, *shape)


def plot_interpolation(model: Any, x0: Any, x1: Any, path: str | os.PathLike, steps: int = 10,
                       image_shape: Any = None) -> Path:
    """A strip: x0, then decode((1 - t) * encode(x0) + t * encode(x1)) for `steps` values of
    t evenly spaced from 0 to 1, then x1 (steps >= 2). For a VAE the codes are the posterior
    means. x0, x1: one sample each (the model's input shape, flat, or with a leading 1)."""
    path = _check_path(path)
    steps = check_int(steps, "steps", minimum=2)
    _check_image_count(steps + 2, "steps", f"{steps} steps", f"pass steps={_MAX_IMAGES - 2} or less")
    pair = np.concatenate([_one_sample(x0, "x0", model), _one_sample(x1, "x1", model)])
    given = tuple(np.shape(x0))  # x0 passed as an image, (H, W) or (1, H, W), is drawn so
    if len(given) >= 2 and given[0] == 1:  # a batch of one
        given = given[1:]
    shape = _image_shape(image_shape, tuple(pair.shape[1:]), given)
    codes = np.asarray(model.encode(pair), dtype=np.float64)
    t = np.linspace(0.0, 1.0, steps)[:, None]
    path_codes = ((1.0 - t) * codes[0] + t * codes[1]).astype(np.float32)
    decoded = _as_images(np.asarray(model.decode(path_codes)), shape)
    ends = _as_images(pair, shape)
    low, high = _display_range(ends)
    figure = _figure(max(_MIN_WIDTH_INCHES, _CELL_INCHES * (steps + 2)), _CELL_INCHES + 0.6, axes=steps + 2)
    grid = figure.subplots(1, steps + 2, squeeze=False)[0]
    _draw(grid[0], ends[0], low, high, "x0")
    for j in range(steps):
        _draw(grid[j + 1], decoded[j], low, high, f"t={t[j, 0]:.2f}")
    _draw(grid[-1], ends[1], low, high, "x1")
    _suptitle(figure, f"{type(model).__name__}: decoded along the line between two codes")
    return _save(figure, path)


def plot_neighbors(model_or_Z: Any, X: Any, queries: Any, path: str | os.PathLike, k: int = 8,
                   image_shape: Any = None, *, labels: Any = None) -> Path:
    """One row per query: the query's image, then its k nearest neighbours in the latent
    space (itself excluded; squared L2, exact search with latentspace.knn), captioned with
    their row number, distance and (with labels) label.

    model_or_Z: a latentspace model (X is encoded with it) or the codes Z, (n, d), one per
    row of X. X: the n samples to draw. queries: a row number or a list of them.
    labels: optional (n,) integer labels for the captions.
    """
    from .metrics import self_dropped
    from .search import knn

    path = _check_path(path)
    x = _rows(X, "X")
    n = x.shape[0]
    sample_shapes = [tuple(x.shape[1:])]
    z = _neighbor_codes(model_or_Z, x)
    if _is_model(model_or_Z):
        sample_shapes.append(_input_shape(model_or_Z))
    rows = _query_rows(queries, n)
    k = check_k(k)
    if k + 1 > n:
        raise ValueError(f"k: {k} neighbours besides the query need at least {k + 1} samples, got {n}")
    if k + 1 > _MAX_IMAGES:  # too many for even one query
        _check_image_count(rows.size * (k + 1), "k", f"{k:,} neighbours of {rows.size:,} queries",
                           f"pass k={_MAX_IMAGES - 1} or less")
    _check_image_count(rows.size * (k + 1), "queries", f"{rows.size:,} queries with k={k} neighbours",
                       f"pass at most {_MAX_IMAGES // (k + 1):,} queries at k={k}")
    y = None if labels is None else as_labels(labels, "labels", n)
    shape = _image_shape(image_shape, *sample_shapes)
    distances, indices = knn(z[rows], z, k + 1)
    keep = self_dropped(indices, rows)
    indices = np.take_along_axis(indices, keep, axis=1)
    distances = np.take_along_axis(distances, keep, axis=1)
    images = _as_images(x, shape)
    low, high = _display_range(images[np.concatenate([rows, indices.ravel()])])
    figure = _figure(max(_MIN_WIDTH_INCHES, _CELL_INCHES * (k + 1)), (_CELL_INCHES + 0.3) * rows.size + 0.4,
                     axes=rows.size * (k + 1))
    grid = figure.subplots(rows.size, k + 1, squeeze=False)
    for r, query in enumerate(rows):
        tag = "" if y is None else f" ({y[query]})"
        _draw(grid[r, 0], images[query], low, high, f"query #{query}{tag}")
        for j in range(k):
            other = indices[r, j]
            tag = "" if y is None else f" ({y[other]})"
            _draw(grid[r, j + 1], images[other], low, high, f"#{other}{tag}\nd={distances[r, j]:.3g}")
    _suptitle(figure, f"nearest neighbours in the latent space ({z.shape[1]} dims)")
    return _save(figure, path)


def _neighbor_codes(model_or_Z: Any, x: np.ndarray) -> np.ndarray:
    """The codes searched by plot_neighbors, one per sample of x, checked here, under this
    function's names: knn would refuse a bad row as one of its own `queries` or `database`."""
    if not _is_model(model_or_Z):
        z, _ = as_matrix(model_or_Z, "model_or_Z")
        if z.shape[0] != x.shape[0]:
            raise ValueError(f"model_or_Z: expected one code per sample of X ({x.shape[0]}), got shape {z.shape}")
        check_rows_usable(z, "model_or_Z")
        return z
    _check_finite_rows(x, "X")  # a NaN sample makes a NaN code: name the sample
    name = "model_or_Z.encode(X)"
    z, _ = as_matrix(model_or_Z.encode(_model_rows(model_or_Z, x, "X")), name)
    check_rows_usable(z, name)  # finite samples, but codes too large to compare
    return z


def _check_finite_rows(x: np.ndarray, name: str) -> None:
    """Refuses samples (n, ...) of which one holds NaN or Inf, naming `name` and its first
    such row (latentspace plot checks its data file with it before encoding)."""
    width = math.prod(x.shape[1:])  # explicit: reshape(0, -1) is ambiguous
    finite = np.isfinite(x.reshape(x.shape[0], width)).all(axis=1)
    if not finite.all():
        raise ValueError(f"{name}: row {int(np.argmin(finite))} contains NaN or Inf; clean the data first")


def _query_rows(queries: Any, n: int) -> np.ndarray:
    rows = np.atleast_1d(queries.detach().cpu().numpy() if is_torch_tensor(queries) else np.asarray(queries))
    if rows.dtype.kind not in "iu" or rows.ndim != 1 or rows.size < 1:
        raise TypeError(f"queries: expected a row number or a 1-d list of them, got {queries!r}")
    bad = rows[(rows < 0) | (rows >= n)]
    if bad.size:
        raise ValueError(f"queries: row {bad[0]} is out of range for X's {n} samples")
    return rows.astype(np.int64)


def _bar_heights(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bar heights for scores that may hold +-inf, and which are infinite: an infinite score's
    bar reaches a fifth of the finite scores' reach past the farthest of them (its sign's
    way), so it stands out without flattening the others."""
    infinite = np.isinf(scores)
    finite = scores[~infinite]
    reach = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
    heights = scores.copy()
    heights[scores == np.inf] = max(float(finite.max()) if finite.size else 0.0, 0.0) + 0.2 * reach
    heights[scores == -np.inf] = min(float(finite.min()) if finite.size else 0.0, 0.0) - 0.2 * reach
    return heights, infinite


def plot_relevance(scores: Any, path: str | os.PathLike, labels: Any = None, *, title: str | None = None) -> Path:
    """A bar per latent dimension, its height the score (latentspace.relevance's output, or
    any per-dimension numbers), the best one highlighted. An infinite score (relevance gives
    +inf to a dimension that separates the classes alone) is drawn as a hatched bar past the
    finite ones, marked with its sign and ∞. labels: a name per dimension (default z0, z1,
    ...). title: the picture's title (default: how many dimensions, and the best)."""
    path = _check_path(path)
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title: expected a string (or None), got {type(title).__name__} {title!r}")
    s = as_scores(scores, allow_inf=True)
    if labels is None:
        names = [f"z{j}" for j in range(s.size)]
    else:
        if isinstance(labels, (str, bytes)) or not hasattr(labels, "__len__"):
            raise TypeError(f"labels: expected a list of {s.size} names, got {labels!r}")
        names = [str(name) for name in labels]
        if len(names) != s.size:
            raise ValueError(f"labels: expected {s.size} names (one per score), got {len(names)}")
    figure = _figure(min(max(4.0, _BAR_INCHES * s.size + 1.5), _MAX_RELEVANCE_INCHES), 3.5)
    ax = figure.add_subplot()
    best = int(np.argmax(s))
    colours = ["tab:orange" if j == best else "tab:blue" for j in range(s.size)]
    heights, infinite = _bar_heights(s)
    bars = ax.bar(np.arange(s.size), heights, color=colours)
    for j in np.flatnonzero(infinite):
        bars[j].set_hatch("//")
        ax.annotate("∞" if s[j] > 0 else "-∞", (j, heights[j]), ha="center", va="bottom" if s[j] > 0 else "top",
                    fontsize=9)
    named = np.arange(0, s.size, math.ceil(s.size / _MAX_NAMED_BARS))  # every bar, up to 96
    ax.set_xticks(named, [names[j] for j in named], rotation=90 if s.size > 16 else 0, fontsize=8)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xlabel("latent dimension")
    ax.set_ylabel("relevance score")
    ax.set_title(_fitted(title if title is not None else f"relevance of {s.size} latent dimensions "
                         f"(best: {names[best]})", figure))
    return _save(figure, path)
