"""`latentspace plot KIND MODEL DATA --out FILE.png`: the pictures of latentspace.plots from
the shell, for a saved model and a data file (or `digits`, the bundled dataset, with its
labels).

    map              2-D map of the codes coloured by label (--method auto | pca | umap)
    reconstructions  originals over reconstructions (-n)
    interpolation    decoded points between two samples' codes (--pair I,J, --steps)
    neighbors        query images and their k nearest in latent space (--queries, -k)
    relevance        a bar per latent dimension (--method fisher | mutual_info | variance | kl)

Bad input raises ValueError / TypeError / OSError / ImportError, which cli.main turns into
one error line and exit status 2, naming the flags and files the user typed (_PLOT_NAMES).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from . import datasets
from ._arrays import check_int
from .cli_demo import printable
from .cli_pipeline import check_out, echoed, option_labels, thread_count
from .runtime import set_num_threads

__all__ = ["add_commands"]

KINDS = ("map", "reconstructions", "interpolation", "neighbors", "relevance")
# latentspace.plots' (and relevance's) parameter names in plot's errors -> the flag, or the
# data file ({data}, formatted with the arguments), that the user typed. See cli.main.
_PLOT_NAMES = {"key": "--key", "n": "-n", "steps": "--steps", "k": "-k", "queries": "--queries",
               "method": "--method", "image_shape": "--image-shape", "labels": "--labels", "y": "--labels",
               "X": "{data}", "x0": "{data}", "x1": "{data}", "Z": "{data} (encoded)",
               "model_or_Z.encode(X)": "{data} (encoded)", "model": "{model}"}
_RELEVANCE_TITLES = {"fisher": "Fisher score (ANOVA F) per latent dimension",
                     "mutual_info": "mutual information with the labels (nats) per latent dimension",
                     "variance": "variance per latent dimension",
                     "kl": "mean KL(q(z|x) || N(0, 1)) per latent dimension (nats)"}


def _int_list(text: str, option: str, count: int | None = None) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or (count is not None and len(values) != count) or min(values) < 0:
        want = f"{count} comma-separated row numbers" if count else "comma-separated row numbers"
        raise ValueError(f"{option}: expected {want} such as {','.join(map(str, range(count or 3)))}, "
                         f"got {echoed(text, quoted=True)}")
    return values


def _data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(X, labels or None, a name for messages): `digits` comes with its labels; a file's
    labels come from --labels (a .npy or .npz) or --labels-key (an array of the data's .npz)."""
    if args.data == "digits":
        if args.key is not None:
            raise ValueError("--key: 'digits' is the bundled dataset, not a file; drop --key")
        X, labels = datasets.load_digits()
        name = "the scikit-learn digits"
    else:
        X, labels, name = datasets.load_array(args.data, args.key), None, echoed(args.data)
        if X.ndim < 2:
            raise ValueError(f"{name}: expected rows of samples (n, ...), got shape {X.shape}")
    if args.labels is not None or args.labels_key is not None:
        source = args.labels if args.labels is not None else args.data
        if source == "digits":
            raise ValueError("--labels-key: the digits come with their labels; pass --labels FILE for others")
        labels = option_labels(source, X.shape[0], name, args.labels_key, "--labels-key")
    if args.limit is not None:
        limit = check_int(args.limit, "--limit")
        X = X[:limit]
        labels = None if labels is None else labels[:limit]
    return X, (None if labels is None else np.asarray(labels)), name


def _image_shape(args: argparse.Namespace) -> tuple[int, ...] | None:
    if args.image_shape is None:
        return None
    try:
        shape = tuple(int(part) for part in args.image_shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) not in (2, 3) or min(shape) < 1:  # (C = 1 or 3 is plots' to check)
        raise ValueError(f"--image-shape: expected H,W or C,H,W (sizes >= 1) such as 28,28 or 1,28,28, "
                         f"got {echoed(args.image_shape, quoted=True)}")
    return shape


def _row(X: np.ndarray, i: int, option: str) -> np.ndarray:
    if i >= X.shape[0]:
        raise ValueError(f"{option}: row {i} is out of range for the data's {X.shape[0]} rows")
    return np.asarray(X[i])


def _command_plot(args: argparse.Namespace) -> int:
    import torch

    from . import plots
    from .feature_relevance import relevance
    from .models import load_model

    if args.threads is not None:
        set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    check_out(args.out, ".png", args.model, args.data, args.labels)  # before any work
    model = load_model(args.model).eval()
    X, labels, name = _data(args)
    plots._check_finite_rows(X, name)  # else a NaN row is refused later, as a code or a search row
    image_shape = _image_shape(args)
    kind = args.kind
    if kind == "reconstructions":
        plots.plot_reconstructions(model, X, args.out, n=args.n, image_shape=image_shape)
        what = f"{min(args.n, X.shape[0])} samples of {name} and their reconstructions"
    elif kind == "interpolation":
        i, j = _int_list(args.pair, "--pair", 2)
        plots.plot_interpolation(model, _row(X, i, "--pair"), _row(X, j, "--pair"), args.out, steps=args.steps,
                                 image_shape=image_shape)
        what = f"{args.steps} steps from row {i} to row {j} of {name}"
    elif kind == "neighbors":
        queries = _int_list(args.queries, "--queries")
        for i in queries:  # (plots names its own X, which the user never typed)
            _row(X, i, "--queries")
        plots.plot_neighbors(model, X, np.array(queries), args.out, k=args.k, image_shape=image_shape, labels=labels)
        what = f"the {args.k} nearest neighbours of {len(queries)} rows of {name}"
    else:
        rows = plots._model_rows(model, np.asarray(X), echoed(args.data))
        if kind == "map":
            method = args.method or "auto"
            codes = model.encode(rows)
            plots.plot_latent_map(codes, labels, args.out, method=method)
            umap = method == "umap" or (method == "auto" and plots._umap_installed())
            projection = "UMAP" if umap else "PCA" if codes.shape[1] > 2 else "2 dims as they are"
            what = (f"{X.shape[0]:,} codes of {name}, {projection}"
                    + ("" if labels is not None else ", no labels: one colour"))
        else:
            method = args.method or ("fisher" if labels is not None else "variance")
            if method not in _RELEVANCE_TITLES:  # (relevance() would add "or None", which no one types)
                choices = ", ".join(map(repr, _RELEVANCE_TITLES))
                raise ValueError(f"--method: expected one of {choices} for relevance, "
                                 f"got {echoed(method, quoted=True)}")
            if method in ("fisher", "mutual_info") and labels is None:
                raise ValueError(f"--labels: method {method!r} needs class labels; pass --labels FILE "
                                 "(or --labels-key KEY), or --method variance / kl")
            if method == "kl":
                scores = relevance(None, method="kl", model=model, X=rows)
            else:
                scores = relevance(model.encode(rows), labels, method=method)
            plots.plot_relevance(scores, args.out, title=_RELEVANCE_TITLES.get(method))
            top = ", ".join(f"z{d}" for d in np.argsort(-scores, kind="stable")[:3])
            what = f"{method} scores of {scores.size} latent dimensions on {name} (best: {top})"
    print(printable(f"latentspace plot {kind}: {args.out} ({what})"))
    return 0


def add_commands(sub: Any) -> None:
    """Adds `plot` to the `latentspace` parser's subcommands."""
    plot = sub.add_parser("plot", help="draw a picture of a model's latent space into a PNG",
                          description="Pictures of a saved model's latent space (matplotlib PNG files). "
                          "See docs/similarity.md.")
    plot.add_argument("kind", choices=KINDS, help="which picture")
    plot.add_argument("model", help="a model file written by latentspace train / save_model")
    plot.add_argument("data", help="'digits' (bundled, with labels) or a .npy, .npz (--key) or .hdf5 file")
    plot.add_argument("--out", required=True, help="the picture, a .png (written atomically)")
    plot.add_argument("--key", default=None, help="the data's array in an .npz, or hdf5 part (default train)")
    plot.add_argument("--labels", default=None, help="class labels, (n,) integers: a .npy or .npz file")
    plot.add_argument("--labels-key", default=None,
                      help="the labels' array in the --labels .npz, or in the data's .npz when --labels is not given")
    plot.add_argument("--limit", type=int, default=None, help="use only the first N rows of the data")
    plot.add_argument("--method", default=None,
                      help="map: auto (UMAP when umap-learn is installed, else PCA), pca, umap; "
                      "relevance: fisher (default with labels), mutual_info, variance (default without), kl (VAE)")
    plot.add_argument("-n", type=int, default=10, help="reconstructions: samples shown (default 10)")
    plot.add_argument("--pair", default="0,1", help="interpolation: the two rows I,J (default 0,1)")
    plot.add_argument("--steps", type=int, default=10, help="interpolation: decoded steps (default 10)")
    plot.add_argument("--queries", default="0,1,2", help="neighbors: query rows (default 0,1,2)")
    plot.add_argument("-k", type=int, default=8, help="neighbors: neighbours per query (default 8)")
    plot.add_argument("--image-shape", default=None,
                      help="H,W (or C,H,W) of a sample, when not 8x8 (64 values) or 28x28 (784) or the data's shape")
    plot.add_argument("--threads", type=thread_count, default=None, help="threads (latentspace and torch)")
    plot.set_defaults(run=_command_plot, api_names=_PLOT_NAMES)
