"""`latentspace demo`: latent spaces of the bundled handwritten digits, measured and pictured.

On a stratified 70/30 split (seed 0) it learns the latent spaces on the training digits and
measures, on the held-out ones (encoded by the trained encoders: new points), how well
similarity survives: k-NN label agreement, trustworthiness and reconstruction error for raw
pixels, PCA, each learned model's plain latent space, that space weighted by feature
relevance (Fisher scores of the training codes), and a metric-learned space (an autoencoder
trained with a supervised contrastive term). Then it indexes the first model's codes, prints
a few digits' nearest neighbours, and writes the pictures (docs/similarity.md) into --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import datasets
from ._atomic import atomic_file_set, file_set_unwritable
from .cli_pipeline import check_out_folder, echoed, made_folder
from .indexes import FlatIndex
from .runtime import build_info, get_num_threads, set_num_threads

_SHADES = " .:-=+*#%@"

# Demo settings per model kind: sized so that `latentspace demo` (VAE) finishes well under a
# minute on 2 cores, and measured to beat PCA at 8 dims on the held-out digits (docs/models.md).
DEMO_MODELS = {
    "vae": dict(title="VAE", epochs=300, batch_size=32, lr=2e-3, patience=None),
    "autoencoder": dict(title="Autoencoder", epochs=150, batch_size=64, lr=2e-3, patience=30),
    "conv": dict(title="ConvAutoencoder", epochs=60, batch_size=64, lr=2e-3, patience=None),
}
# The metric-learned space (docs/metric_learning.md): a 64-128-8 autoencoder trained with the
# supervised contrastive term on the training labels; >= 0.95 held-out 10-NN agreement on
# seeds 0 to 9 there.
METRIC_LEARNED = dict(title="metric-learned AE", hidden=(128,), epochs=100, batch_size=64, lr=2e-3,
                      metric_loss="supcon", metric_weight=5.0)
# Relevance weights from the training codes: Fisher scores (between-class over within-class
# variance per dimension) raised to this power, mean 1. On the demo's VAE, seeds 0-2, power
# 0.5 lifts held-out 10-NN agreement on every seed, power 1 on one of three, power 2 on none
# (docs/similarity.md; benchmarks/relevance_weights_table.py).
RELEVANCE_POWER = 0.5
TRUSTWORTHINESS_K = 10
# The pictures written into --out (docs/similarity.md), in the order they are drawn.
PICTURES = ("latent_map.png", "reconstructions.png", "interpolation.png", "neighbors.png", "relevance.png")
# The pictures are drawn into a hidden folder in --out, .latentspace-demo.<16 hex>.tmp, and
# replace the earlier run's together once all five are drawn (_atomic.atomic_file_set).
STAGING_TAG = "latentspace-demo"
_SHOWN = 4  # --show's default: neighbours drawn per digit (fewer when -k searches fewer)


def printable(text: str) -> str:
    """A line that holds paths, as printed: a file name's bytes that are no text in the file
    system's encoding (a Latin-1 name under UTF-8) as \\xNN escapes, as `ls -b` shows them.
    As they were, print() failed on a stdout that refuses them (a strict UTF-8 locale) after
    all the work was done."""
    return os.fsencode(text).decode(sys.getfilesystemencoding(), "backslashreplace")


def digit_rows(image: np.ndarray) -> list[str]:
    """An 8x8 image in [0, 1] as 8 lines of ASCII shading (two characters per pixel)."""
    levels = np.minimum((image.reshape(8, 8) * (len(_SHADES) - 1)).round().astype(int), len(_SHADES) - 1)
    return ["".join(_SHADES[v] * 2 for v in row) for row in levels]


def demo_model(kind: str, latent_dim: int):
    from .models import VAE, Autoencoder, ConvAutoencoder

    if kind == "vae":
        return VAE(64, latent_dim, hidden=(256, 128), kl_warmup=20)
    if kind == "autoencoder":
        return Autoencoder(64, latent_dim, hidden=(256, 128), output="sigmoid")
    return ConvAutoencoder((1, 8, 8), latent_dim, channels=(32, 64))


def parse_models(text: str) -> list[str]:
    kinds = [part.strip() for part in text.split(",") if part.strip()]
    unknown = list(dict.fromkeys(k for k in kinds if k not in DEMO_MODELS))
    if not kinds or unknown:
        # which items are wrong, in a long list too; "pca" is `latentspace train`'s, and the demo's own
        named = echoed(", ".join(repr(k) + (" (PCA is always measured)" if k == "pca" else "") for k in unknown))
        raise ValueError(f"--models: expected a comma-separated list of {', '.join(DEMO_MODELS)}, "
                         f"got {echoed(text, quoted=True)}" + (f": unknown {named}" if unknown else ""))
    return list(dict.fromkeys(kinds))


class _Split:
    """The digits, split 70/30 stratified (seed 0)."""

    def __init__(self):
        self.images, self.labels = datasets.load_digits()
        self.train_rows, self.test_rows = datasets.stratified_split(self.labels, test_fraction=0.3, seed=0)
        self.x_train, self.y_train = self.images[self.train_rows], self.labels[self.train_rows]
        self.x_test, self.y_test = self.images[self.test_rows], self.labels[self.test_rows]


def _row(title: str, codes: np.ndarray, split: _Split, k: int, mse: float | None, weights=None) -> tuple:
    from .metrics import knn_label_agreement, trustworthiness

    agreement = knn_label_agreement(codes, split.y_test, k=k, weights=weights)
    scaled = codes if weights is None else codes * np.sqrt(weights)  # trustworthiness of the weighted space
    trust = trustworthiness(split.x_test, scaled, k=TRUSTWORTHINESS_K)
    return title, codes.shape[1], mse, agreement, trust


def _train(model, x: np.ndarray, settings: dict, args: argparse.Namespace, **extra):
    from .training import train

    epochs = args.epochs or settings["epochs"]
    history = train(model, x, epochs=epochs, batch_size=settings["batch_size"], lr=settings["lr"], val_fraction=0.1,
                    early_stopping=settings.get("patience"), seed=args.seed, device="cpu",
                    progress=sys.stderr.isatty(), **extra)
    print(f"  {settings['title']}: {history.epochs_run} epochs in {history.seconds:.1f} s "
          f"({history.samples_per_second:,.0f} samples/s), best validation loss "
          f"{history.best_loss:.3f} at epoch {history.best_epoch + 1}")
    return history


def _check_counts(args: argparse.Namespace, n: int, held_out: int) -> None:
    """-k and --examples against the digits, --show against -k, and --latent-dim against the
    latent map (else errors after training, naming the API's Z or numpy's sample); -k < 1 is
    the metrics' to refuse, by the same name."""
    if args.k >= held_out:
        raise ValueError(f"-k: {args.k} neighbours need at least {args.k + 1} held-out digits, there are {held_out}")
    if args.show is None:  # not typed: the default, cut to what -k searches
        args.show = min(_SHOWN, max(args.k, 1))
    elif args.show > args.k >= 1:  # (a typed --show was cut to -k without a word)
        raise ValueError(f"--show: {args.show} neighbours drawn per digit, but -k searches {args.k}; "
                         "lower --show or raise -k")
    if args.examples > n:
        raise ValueError(f"--examples: {args.examples} digits to show, but there are {n}")
    if args.latent_dim == 1:  # (< 1 is the models' to refuse, by the same name)
        raise ValueError("--latent-dim: the latent map needs at least 2 dimensions, got 1")


def _check_pictures_writable(out_dir: Path) -> None:
    """Each picture's path in --out, checked before any training (a folder of a picture's name,
    or a path too long for the file system once the name is added, failed only as the
    pictures were written, naming no flag); their staged copies' paths too."""
    found = file_set_unwritable(out_dir, PICTURES, tag=STAGING_TAG)  # (lengths first: is_dir() of one too long raises)
    if found is not None:
        path, problem = found
        if problem[0] is IsADirectoryError:
            raise ValueError(f"--out: {echoed(path)} is a folder, where the demo writes a picture; "
                             "move it, or pass another --out")
        raise ValueError(f"--out: {echoed(out_dir)} cannot hold the demo's pictures: {problem[1]}")


def command_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    kinds = parse_models(args.models)  # before the imports: a typo fails at once
    # (refused empty, Path("") being the current folder, and too long to look up: named, before .exists() fails)
    out_dir = check_out_folder(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out: {echoed(out_dir)} exists and is not a folder")

    from . import plots

    plots._require_matplotlib()  # missing, or a bad MPLBACKEND: refused now, not after the training
    import torch

    if args.threads is not None:
        set_num_threads(args.threads)
    search_threads = get_num_threads()  # (read before torch's setting: OpenMP's default)
    # These models are small: one thread trains them faster than two on 2 cores (no fork-join
    # per tiny matmul or loss) and does not collapse when another process shares the CPU
    # (two threads, torch's or latentspace's, made the demo 3x slower beside one busy process).
    torch.set_num_threads(args.threads or 1)
    set_num_threads(args.threads or 1)
    split = _Split()
    _check_counts(args, split.images.shape[0], len(split.test_rows))  # before any training, as is --out:
    # made now (a file above it failed only when the pictures were written), and removed again
    # if it ends empty: a run refused later (--latent-dim, -k < 1) or interrupted leaves nothing
    with made_folder(args.out):
        _check_pictures_writable(out_dir)
        return _run_demo(args, kinds, split, out_dir, search_threads, started)


def _run_demo(args: argparse.Namespace, kinds: list[str], split: _Split, out_dir: Path, search_threads: int,
              started: float) -> int:
    """The demo's work, once the digits are split and --out is a folder."""
    import torch

    from .feature_relevance import relevance, relevance_weights
    from .metrics import reconstruction_mse
    from .models import PCA, Autoencoder

    n, dim = split.images.shape
    print(f"latentspace demo: latent spaces of the {n:,} handwritten digits bundled with "
          f"scikit-learn ({dim} pixels each)")
    print(f"  split: {len(split.train_rows):,} training / {len(split.test_rows):,} held-out digits "
          "(stratified 70/30, seed 0)")

    k, d = args.k, args.latent_dim
    rows = [_row("raw pixels", split.x_test, split, k, 0.0)]
    pca = PCA(d).fit(split.x_train)
    rows.append(_row("PCA", pca.encode(split.x_test), split, k, reconstruction_mse(split.x_test, pca(split.x_test))))
    print(f"  PCA: {d} components, {float(pca.explained_variance_ratio.sum()):.1%} of the variance")
    trained, scores = {}, {}
    for kind in kinds:
        settings = DEMO_MODELS[kind]
        torch.manual_seed(args.seed)
        model = demo_model(kind, d)
        if _train(model, split.x_train, settings, args).interrupted:
            print("latentspace demo: interrupted", file=sys.stderr)
            return 130
        codes = model.encode(split.x_test)
        mse = reconstruction_mse(split.x_test, model(split.x_test))
        rows.append(_row(settings["title"], codes, split, k, mse))
        # Which latent dimensions separate the digits, judged on the training codes only.
        scores[kind] = relevance(model.encode(split.x_train), split.y_train, method="fisher")
        weights = relevance_weights(scores[kind], power=RELEVANCE_POWER)
        rows.append(_row(f"{settings['title']} + relevance", codes, split, k, mse, weights=weights))
        trained[kind] = model
    if not args.no_metric_learning:
        torch.manual_seed(args.seed)
        learned = Autoencoder(dim, d, hidden=METRIC_LEARNED["hidden"], output="sigmoid")
        extra = dict(labels=split.y_train, metric_loss=METRIC_LEARNED["metric_loss"],
                     metric_weight=METRIC_LEARNED["metric_weight"])
        if _train(learned, split.x_train, METRIC_LEARNED, args, **extra).interrupted:
            print("latentspace demo: interrupted", file=sys.stderr)
            return 130
        rows.append(_row(METRIC_LEARNED["title"], learned.encode(split.x_test), split, k,
                         reconstruction_mse(split.x_test, learned(split.x_test))))

    width = max(24, *(len(row[0]) for row in rows))  # the longest title ("ConvAutoencoder + relevance")
    heading = f"held-out digits ({len(split.test_rows)})"
    print(f"\n  {heading:<{width + 2}}  dims   reconstruction MSE   {k}-NN label agreement"
          f"   trustworthiness ({TRUSTWORTHINESS_K})")
    for title, dims, mse, agreement, trust in rows:
        print(f"    {title:<{width}} {dims:>5}   {mse:>18.4f}   {agreement:>20.3f}   {trust:>19.3f}")
    print()

    set_num_threads(search_threads)
    kind = kinds[0]
    _neighbourhoods(trained[kind], DEMO_MODELS[kind]["title"], split, args)
    pictures = _pictures(out_dir, trained[kind], DEMO_MODELS[kind]["title"], scores[kind], split, args)
    print(printable(f"  pictures: {len(pictures)} PNG files in {out_dir.resolve()}: "
                    + ", ".join(p.name for p in pictures)))
    print(f"  demo finished in {time.perf_counter() - started:.1f} s")
    return 0


def _neighbourhoods(model, title: str, split: _Split, args: argparse.Namespace) -> None:
    """An index over the model's codes of all digits, and a few digits' neighbours in ASCII."""
    from .metrics import knn_label_agreement, self_dropped

    images, labels = split.images, split.labels
    n = images.shape[0]
    codes = model.encode(images)
    index = FlatIndex(codes.shape[1], metric="l2")
    index.add(codes)
    print(f"  index: {index!r} over the {title} codes of all {n:,} digits, "
          f"{index.bytes_per_vector} bytes per vector")
    start = time.perf_counter()
    distances, indices = index.search(codes, args.k + 1)  # the first neighbour is the digit itself
    elapsed = time.perf_counter() - start
    print(f"  searched all {n:,} digits for {args.k} neighbours each in {elapsed * 1e3:.1f} ms "
          f"({build_info()['simd_level']}, {get_num_threads()} threads)")
    print(f"  {args.k}-NN label agreement in the {title}'s latent space (all digits): "
          f"{knn_label_agreement(codes, labels, k=args.k):.3f}\n")
    keep = self_dropped(np.asarray(indices))
    neighbours = np.take_along_axis(indices, keep, axis=1)
    distances = np.take_along_axis(distances, keep, axis=1)
    rng = np.random.default_rng(args.seed)
    for query in rng.choice(n, size=args.examples, replace=False):
        shown = neighbours[query, : args.show]
        print(f"  digit #{query} (label {labels[query]}) and its {len(shown)} nearest neighbours "
              f"in the {title}'s latent space:")
        columns = [digit_rows(images[query])] + [digit_rows(images[j]) for j in shown]
        for line in zip(*columns):
            print("    " + "  |  ".join(line))
        captions = [f"query {labels[query]}".ljust(16)] + [f"#{j} label {labels[j]}".ljust(16) for j in shown]
        dists = [" " * 16] + [f"d={distances[query, i]:.2f}".ljust(16) for i in range(len(shown))]
        print("    " + "  |  ".join(captions))
        print("    " + "  |  ".join(dists) + "\n")


def _pictures(out_dir: Path, model, title: str, scores: np.ndarray, split: _Split,
              args: argparse.Namespace) -> list[Path]:
    """The five pictures of docs/similarity.md for the first model, on the held-out digits.

    They are one set, drawn by one run from one model: a run stopped while drawing them (Ctrl-C,
    a full disk, an error) left the pictures drawn so far beside the earlier run's others, and
    two runs into one --out could interleave theirs, with nothing to tell. So they are drawn
    into a staging folder and published together: --out holds the earlier run's five or this
    run's five, never a mix, and the user's other files there are never touched."""
    from . import plots

    out_dir.mkdir(parents=True, exist_ok=True)
    x, y = split.x_test, split.y_test
    rng = np.random.default_rng(args.seed)
    first, second = (int(np.flatnonzero(y == digit)[0]) for digit in (3, 8))  # two digits to morph
    queries = rng.choice(len(x), size=4, replace=False).tolist()  # row numbers of x
    with atomic_file_set(out_dir, PICTURES, tag=STAGING_TAG) as staging:
        latent_map, reconstructions, interpolation, neighbors, relevance = (staging / name for name in PICTURES)
        plots.plot_latent_map(model.encode(x), y, latent_map)
        plots.plot_reconstructions(model, x, reconstructions, n=10)
        plots.plot_interpolation(model, x[first], x[second], interpolation, steps=10)
        plots.plot_neighbors(model, x, queries, neighbors, k=8, labels=y)
        plots.plot_relevance(scores, relevance, title=f"Fisher score per {title} dimension")
    return [out_dir / name for name in PICTURES]
