"""The `latentspace` command line: `latentspace info`, `latentspace demo`, `latentspace train`,
the pipeline commands `encode`, `index build`, `search` (in cli_pipeline.py), and `plot`
(in cli_plot.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import datasets
from .cli_pipeline import add_commands as _add_pipeline_commands
from .cli_plot import add_commands as _add_plot_commands
from .indexes import FlatIndex
from .runtime import build_info, get_num_threads, set_num_threads

_SHADES = " .:-=+*#%@"


def _digit_rows(image: np.ndarray) -> list[str]:
    """An 8x8 image in [0, 1] as 8 lines of ASCII shading (two characters per pixel)."""
    levels = np.minimum((image.reshape(8, 8) * (len(_SHADES) - 1)).round().astype(int), len(_SHADES) - 1)
    return ["".join(_SHADES[v] * 2 for v in row) for row in levels]


def _command_info(args: argparse.Namespace) -> int:
    info = build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"latentspace {info['version']}")
    print(f"  SIMD level in use : {info['simd_level']} (CPU supports {info['hardware_simd_level']})")
    print(f"  OpenMP threads    : {info['num_threads']}")
    arch = ", ".join(f"sm_{a}" for a in info["cuda_architectures"]) or "-"
    print(f"  CUDA compiled in  : {'yes' if info['cuda_compiled'] else 'no'} (architectures: {arch})")
    if info["gpu_visible"]:
        for device in info["cuda_devices"]:
            major, minor = device["compute_capability"]
            print(f"  GPU {device['index']}             : {device['name']} (sm_{major}{minor}, "
                  f"{device['total_memory_bytes'] / 2**30:.0f} GiB)")
    else:
        print(f"  GPU visible now   : no ({info['cuda_unavailable_reason']})")
    return 0


# Demo settings per model kind: sized so that `latentspace demo` (VAE) finishes well under a
# minute on 2 cores, and measured to beat PCA at 8 dims on the held-out digits (docs/models.md).
_DEMO_MODELS = {
    "vae": dict(title="VAE", epochs=300, batch_size=32, lr=2e-3, patience=None),
    "autoencoder": dict(title="Autoencoder", epochs=150, batch_size=64, lr=2e-3, patience=30),
    "conv": dict(title="ConvAutoencoder", epochs=60, batch_size=64, lr=2e-3, patience=None),
}


def _demo_model(kind: str, latent_dim: int):
    from .models import VAE, Autoencoder, ConvAutoencoder

    if kind == "vae":
        return VAE(64, latent_dim, hidden=(256, 128), kl_warmup=20)
    if kind == "autoencoder":
        return Autoencoder(64, latent_dim, hidden=(256, 128), output="sigmoid")
    return ConvAutoencoder((1, 8, 8), latent_dim, channels=(32, 64))


def _parse_models(text: str) -> list[str]:
    kinds = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [k for k in kinds if k not in _DEMO_MODELS]
    if not kinds or unknown:
        raise ValueError(f"--models: expected a comma-separated list of {', '.join(_DEMO_MODELS)}, got {text!r}")
    return list(dict.fromkeys(kinds))


def _command_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    kinds = _parse_models(args.models)  # before the imports: a typo fails at once

    import torch

    from .metrics import knn_label_agreement, reconstruction_mse, self_dropped
    from .models import PCA
    from .training import train

    if args.threads is not None:
        set_num_threads(args.threads)
    search_threads = get_num_threads()  # (read before torch's setting: OpenMP's default)
    # These models are small: one thread trains them faster than two on 2 cores (no fork-join
    # per tiny matmul or loss) and does not collapse when another process shares the CPU
    # (two threads, torch's or latentspace's, made the demo 3x slower beside one busy process).
    torch.set_num_threads(args.threads or 1)
    set_num_threads(args.threads or 1)
    images, labels = datasets.load_digits()
    n, dim = images.shape
    train_rows, test_rows = datasets.stratified_split(labels, test_fraction=0.3, seed=0)
    x_train, x_test, y_test = images[train_rows], images[test_rows], labels[test_rows]
    print(f"latentspace demo: latent spaces of the {n:,} handwritten digits bundled with "
          f"scikit-learn ({dim} pixels each)")
    print(f"  split: {len(train_rows):,} training / {len(test_rows):,} held-out digits "
          "(stratified 70/30, seed 0)")

    rows = [("raw pixels", dim, 0.0, knn_label_agreement(x_test, y_test, k=args.k))]
    pca = PCA(args.latent_dim).fit(x_train)
    rows.append(("PCA", args.latent_dim, reconstruction_mse(x_test, pca(x_test)),
                  knn_label_agreement(pca.encode(x_test), y_test, k=args.k)))
    print(f"  PCA: {args.latent_dim} components, "
          f"{float(pca.explained_variance_ratio.sum()):.1%} of the variance")
    trained = {}
    for kind in kinds:
        settings = _DEMO_MODELS[kind]
        epochs = args.epochs or settings["epochs"]
        torch.manual_seed(args.seed)
        model = _demo_model(kind, args.latent_dim)
        history = train(model, x_train, epochs=epochs, batch_size=settings["batch_size"], lr=settings["lr"],
                        val_fraction=0.1, early_stopping=settings["patience"], seed=args.seed, device="cpu",
                        progress=sys.stderr.isatty())
        if history.interrupted:
            print("latentspace demo: interrupted", file=sys.stderr)
            return 130
        print(f"  {settings['title']}: {history.epochs_run} epochs in {history.seconds:.1f} s "
              f"({history.samples_per_second:,.0f} samples/s), best validation loss "
              f"{history.best_loss:.3f} at epoch {history.best_epoch + 1}")
        rows.append((settings["title"], args.latent_dim, reconstruction_mse(x_test, model(x_test)),
                     knn_label_agreement(model.encode(x_test), y_test, k=args.k)))
        trained[kind] = model

    print(f"\n  held-out digits ({len(test_rows)})   dims   reconstruction MSE   {args.k}-NN label agreement")
    for title, dims, mse, agreement in rows:
        print(f"    {title:<20} {dims:>5}   {mse:>18.4f}   {agreement:>20.3f}")
    print()

    # An index over the first learned model's codes of all digits, and a few neighbourhoods.
    set_num_threads(search_threads)
    kind = kinds[0]
    title = _DEMO_MODELS[kind]["title"]
    codes = trained[kind].encode(images)
    index = FlatIndex(codes.shape[1], metric="l2")
    index.add(codes)
    print(f"  index: {index!r} over the {title} codes of all {n:,} digits, "
          f"{index.bytes_per_vector} bytes per vector")
    k = args.k + 1  # the first neighbour is the digit itself
    start = time.perf_counter()
    distances, indices = index.search(codes, k)
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
        columns = [_digit_rows(images[query])] + [_digit_rows(images[j]) for j in shown]
        for line in zip(*columns):
            print("    " + "  |  ".join(line))
        captions = [f"query {labels[query]}".ljust(16)] + [
            f"#{j} label {labels[j]}".ljust(16) for j in shown
        ]
        dists = [" " * 16] + [f"d={distances[query, i]:.2f}".ljust(16) for i in range(len(shown))]
        print("    " + "  |  ".join(captions))
        print("    " + "  |  ".join(dists) + "\n")
    print(f"  demo finished in {time.perf_counter() - started:.1f} s")
    return 0


def _int_tuple(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated integers such as 256,128, got {text!r}") from None


def _load_training_data(args: argparse.Namespace):
    """(X, labels or None, name) for `latentspace train`."""
    if args.data == "digits":
        images, labels = datasets.load_digits()
        return images, labels, "the scikit-learn digits"
    X = datasets.load_array(args.data, args.key)
    if X.ndim < 2:
        raise ValueError(f"{args.data}: expected rows of vectors (2-d) or images (3-d / 4-d), got shape {X.shape}")
    return X, None, args.data


def _build_model(args: argparse.Namespace, X: np.ndarray, output: str):
    from .models import PCA, VAE, Autoencoder, ConvAutoencoder

    if args.model == "pca":
        return PCA(args.latent_dim, whiten=args.whiten), X.reshape(X.shape[0], -1)
    if args.model == "conv":
        if args.image_shape:
            shape = _int_tuple(args.image_shape, "--image-shape")
        elif args.data == "digits":
            shape = (1, 8, 8)
        elif X.ndim == 4:
            shape = tuple(X.shape[1:])
        elif X.ndim == 3:
            shape = (1, *X.shape[1:])
        else:
            raise ValueError("--image-shape: a ConvAutoencoder on rows of vectors needs the image shape "
                             "C,H,W (e.g. 1,28,28)")
        if X.ndim == 3:
            X = X[:, None]  # (n, H, W) grayscale -> (n, 1, H, W), a view
        channels = _int_tuple(args.channels, "--channels")
        return ConvAutoencoder(shape, args.latent_dim, channels=channels, output=output), X
    X = X.reshape(X.shape[0], -1)
    hidden = _int_tuple(args.hidden, "--hidden")
    if args.model == "vae":
        return VAE(X.shape[1], args.latent_dim, hidden=hidden, beta=args.beta, output=output,
                   kl_warmup=args.kl_warmup), X
    return Autoencoder(X.shape[1], args.latent_dim, hidden=hidden, output=output), X


def _command_train(args: argparse.Namespace) -> int:
    import torch

    from ._atomic import atomic_write
    from .models import save_model
    from .training import train

    if args.threads is not None:
        set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    X, _, name = _load_training_data(args)
    output = args.output
    if output == "auto" and args.model != "pca":
        low, high = float(np.min(X)), float(np.max(X))
        output = "sigmoid" if 0.0 <= low and high <= 1.0 else "linear"
    torch.manual_seed(args.seed)
    model, X = _build_model(args, X, output)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "model.safetensors"
    print(f"latentspace train: {type(model).__name__} (latent_dim {args.latent_dim}) on {name}, "
          f"{X.shape[0]:,} rows of shape {tuple(X.shape[1:])}")
    if args.model == "pca":
        model.fit(X)
        save_model(model, model_path)
        record = {"model": "PCA", "latent_dim": args.latent_dim,
                  "explained_variance_ratio": [float(v) for v in model.explained_variance_ratio]}
        print(f"  fitted in closed form: {sum(record['explained_variance_ratio']):.1%} of the variance kept")
        interrupted = False
    else:
        history = train(model, X, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        val_fraction=args.val_fraction, early_stopping=args.patience or None,
                        seed=args.seed, device=args.device, loss=args.loss, checkpoint=model_path,
                        progress=not args.no_progress)
        record = {"model": type(model).__name__, "config": model.config(), **history.to_dict()}
        interrupted = history.interrupted
        monitored = "validation" if history.monitor == "val_loss" else "training"
        if history.best_epoch is None:
            print("  interrupted before the first epoch ended: nothing saved", file=sys.stderr)
            return 130
        print(f"  {history.epochs_run} epochs in {history.seconds:.1f} s on {history.device} "
              f"({history.samples_per_second:,.0f} samples/s); best {monitored} loss "
              f"{history.best_loss:.4f} at epoch {history.best_epoch + 1}"
              + (", stopped early" if history.stopped_early else ""))
    with atomic_write(out / "history.json") as f:
        f.write((json.dumps(record, indent=2) + "\n").encode())
    print(f"  model: {model_path}\n  history: {out / 'history.json'}")
    if interrupted:
        print("  interrupted (Ctrl-C): the best checkpoint is kept", file=sys.stderr)
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentspace", description="Learn compact latent spaces and search them fast."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="version, SIMD level, threads, CUDA build and GPUs")
    info.add_argument("--json", action="store_true", help="print build_info() as JSON")
    info.set_defaults(run=_command_info)

    demo = sub.add_parser("demo", help="learn latent spaces of the bundled handwritten digits, "
                          "compare them with PCA and raw pixels, and show neighbours")
    demo.add_argument("--models", default="vae",
                      help="learned models to train, comma-separated: vae, autoencoder, conv (default vae)")
    demo.add_argument("--latent-dim", type=int, default=8, help="latent dimensions (default 8)")
    demo.add_argument("--epochs", type=int, default=None,
                      help="training epochs (default per model: vae 300, autoencoder 150, conv 60)")
    demo.add_argument("-k", type=int, default=10, help="neighbours per digit (default 10)")
    demo.add_argument("--examples", type=int, default=3, help="digits to show (default 3)")
    demo.add_argument("--show", type=int, default=4, help="neighbours drawn per digit (default 4)")
    demo.add_argument("--seed", type=int, default=0, help="weights, training and shown digits (default 0)")
    demo.add_argument("--threads", type=int, default=None,
                      help="threads for training and search (default: 1 for training, OpenMP's for search)")
    demo.set_defaults(run=_command_demo)

    trainer = sub.add_parser("train", help="train a latent model on digits or a data file, save it")
    trainer.add_argument("data", help="'digits' (bundled) or a .npy, .npz or ann-benchmarks .hdf5 file")
    trainer.add_argument("--model", choices=("pca", "autoencoder", "vae", "conv"), default="vae",
                         help="model kind (default vae)")
    trainer.add_argument("--latent-dim", type=int, default=8, help="latent dimensions (default 8)")
    trainer.add_argument("--epochs", type=int, default=100, help="at most this many epochs (default 100)")
    trainer.add_argument("--out", required=True, help="output folder: model.safetensors, history.json")
    trainer.add_argument("--key", default=None, help="array in an .npz (or hdf5 part; default train)")
    trainer.add_argument("--hidden", default="256,128", help="MLP hidden widths (default 256,128)")
    trainer.add_argument("--channels", default="32,64", help="conv channels (default 32,64)")
    trainer.add_argument("--image-shape", default=None, help="C,H,W of flattened images (conv)")
    trainer.add_argument("--beta", type=float, default=1.0, help="VAE KL weight (default 1)")
    trainer.add_argument("--kl-warmup", type=float, default=0.0, help="VAE KL warm-up epochs (default 0)")
    trainer.add_argument("--whiten", action="store_true", help="PCA: unit-variance components")
    trainer.add_argument("--output", choices=("auto", "sigmoid", "linear"), default="auto",
                         help="decoder output (default auto: sigmoid when the data lie in [0, 1])")
    trainer.add_argument("--loss", choices=("mse", "bce"), default=None,
                         help="reconstruction loss (default: bce for sigmoid output, mse for linear)")
    trainer.add_argument("--batch-size", type=int, default=128, help="default 128")
    trainer.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    trainer.add_argument("--val-fraction", type=float, default=0.1, help="validation share (default 0.1)")
    trainer.add_argument("--patience", type=int, default=10,
                         help="early stopping patience in epochs, 0 for none (default 10)")
    trainer.add_argument("--seed", type=int, default=0, help="weights, split, shuffling (default 0)")
    trainer.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    trainer.add_argument("--threads", type=int, default=None, help="torch and search threads")
    trainer.add_argument("--no-progress", action="store_true", help="no progress bar")
    trainer.set_defaults(run=_command_train)

    _add_pipeline_commands(sub)
    _add_plot_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = getattr(args, "error_name", args.command)  # "index build", not just "index"
    try:
        return args.run(args)
    except (ValueError, TypeError, OSError, ImportError) as error:
        print(f"latentspace {command}: error: {error}", file=sys.stderr)
        return 2
    except FloatingPointError as error:  # training diverged
        print(f"latentspace {command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"latentspace {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
