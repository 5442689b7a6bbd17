"""The `latentspace` command line: `latentspace info`, `latentspace train`, `latentspace demo`
(in cli_demo.py), the pipeline commands `encode`, `index build`, `search` (in cli_pipeline.py),
and `plot` (in cli_plot.py)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from . import datasets
from .cli_demo import command_demo
from .cli_pipeline import add_commands as _add_pipeline_commands
from .cli_pipeline import (check_out_folder, clip_typed, echoed, made_folder, option_labels, renamed, seed_number,
                           thread_count, whole_number)
from .cli_plot import add_commands as _add_plot_commands
from .runtime import build_info, set_num_threads

# The Python API's parameter names in train's and demo's errors -> their flags (see main).
_TRAIN_NAMES = {"key": "--key", "latent_dim": "--latent-dim", "epochs": "--epochs", "batch_size": "--batch-size",
                "lr": "--lr", "val_fraction": "--val-fraction", "early_stopping": "--patience",
                "device": "--device", "loss": "--loss", "beta": "--beta", "kl_warmup": "--kl-warmup",
                "metric_weight": "--metric-weight", "labels": "--labels", "hidden": "--hidden",
                "channels": "--channels", "input_shape": "--image-shape", "X": "{data}"}
_DEMO_NAMES = {"k": "-k", "latent_dim": "--latent-dim"}


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
    meaning = {"native": "CUDA kernels", "torch": "torch's ops"}
    losses = meaning.get(info["cuda_losses"], info["cuda_losses"])
    print(f"  losses on a GPU   : {losses} (LATENTSPACE_CUDA_LOSSES: native, torch or auto)")
    encoder = {**meaning, "torch": "the model's torch code"}.get(info["cuda_encoder"], info["cuda_encoder"])
    print(f"  encoder on a GPU  : {encoder} (LATENTSPACE_CUDA_ENCODER: native, torch or auto)")
    row_check = meaning.get(info["cuda_row_check"], info["cuda_row_check"])
    print(f"  row check on a GPU: {row_check} (LATENTSPACE_CUDA_ROW_CHECK: native, torch or auto)")
    return 0


def _int_tuple(text: str, name: str) -> tuple[int, ...]:
    """Comma-separated integers ("" or blanks: none). An empty item between commas ("8,,3", a
    slip) is refused: it was dropped, and the model built with one layer fewer than typed."""
    if not text.strip():
        return ()
    parts = text.split(",")
    for position, part in enumerate(parts, start=1):
        if not part.strip():
            raise ValueError(f"{name}: item {position} is empty in {echoed(text, quoted=True)}; expected "
                             "comma-separated integers such as 256,128")
    try:
        return tuple(int(part) for part in parts)
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated integers such as 256,128, got "
                         f"{echoed(text, quoted=True)}") from None


def _load_training_data(args: argparse.Namespace):
    """(X, labels or None, name) for `latentspace train`."""
    if args.data == "digits":
        images, labels = datasets.load_digits()
        return images, labels, "the scikit-learn digits"
    X = datasets.load_array(args.data, args.key)
    if X.ndim < 2:
        raise ValueError(f"{echoed(args.data)}: expected rows of vectors (2-d) or images (3-d / 4-d), "
                         f"got shape {X.shape}")
    if X.size == 0:  # else numpy's errors about a zero-size array, from the steps below
        raise ValueError(f"{echoed(args.data)}: no data to train on, shape {X.shape}")
    return X, None, args.data


def _training_labels(args: argparse.Namespace, bundled: np.ndarray | None, rows: int, name: str):
    """The labels of --metric-loss: the digits' own, or --labels FILE (.npy or .npz, one
    integer per row; --labels-key picks the .npz array), read and checked as `latentspace
    plot` reads its labels (option_labels)."""
    if args.labels_key is not None and args.labels is None:
        raise ValueError("--labels-key: picks the array in the --labels .npz; pass --labels FILE too")
    if args.metric_loss is None:
        if args.labels is not None:
            raise ValueError("--labels: only used with --metric-loss (supervised shaping of the latent space)")
        return None
    if args.model == "pca":
        raise ValueError("--metric-loss: PCA is fitted in closed form; use --model autoencoder, vae or conv")
    if args.labels is not None:
        return option_labels(args.labels, rows, name, args.labels_key, "--labels-key")
    if bundled is None:
        raise ValueError("--metric-loss: needs --labels LABELS.npy, one integer class per row of the data")
    return bundled


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


# Flags that shape one kind of model -> (its attribute, the models that read it, its default).
# Given to another model they were dropped without a word (`--model autoencoder --beta 4`
# trained a plain autoencoder), so they are refused, as --labels is without --metric-loss.
_MODEL_FLAGS = {"--hidden": ("hidden", ("autoencoder", "vae"), "256,128"),
                "--channels": ("channels", ("conv",), "32,64"),
                "--image-shape": ("image_shape", ("conv",), None),
                "--beta": ("beta", ("vae",), 1.0),
                "--kl-warmup": ("kl_warmup", ("vae",), 0.0),
                "--whiten": ("whiten", ("pca",), False)}
_METRIC_WEIGHT = 5.0  # --metric-weight's default (the API's is 1.0: docs/metric_learning.md)


def _check_model_flags(args: argparse.Namespace) -> None:
    """Refuses a flag that args.model does not read, then fills in the defaults (None and
    False stand for "not typed")."""
    for flag, (name, models, default) in _MODEL_FLAGS.items():
        value = getattr(args, name)
        if value is not None and value is not False and args.model not in models:  # (--beta 0 is typed)
            users = " or ".join(f"--model {model}" for model in models)
            raise ValueError(f"{flag}: only {users} uses it (this run trains --model {args.model})")
        if value is None:
            setattr(args, name, default)
    if args.metric_weight is not None and args.metric_loss is None:
        raise ValueError("--metric-weight: weighs the term of --metric-loss; pass --metric-loss too")
    if args.metric_weight is None:
        args.metric_weight = _METRIC_WEIGHT


def _command_train(args: argparse.Namespace) -> int:
    import torch

    _check_model_flags(args)
    check_out_folder(args.out)  # before the data are read: '' (the current folder) is refused by name
    if args.threads is not None:
        set_num_threads(args.threads)
        torch.set_num_threads(args.threads)
    X, bundled_labels, name = _load_training_data(args)
    labels = _training_labels(args, bundled_labels, X.shape[0], name)
    output = args.output
    if output == "auto" and args.model != "pca":
        low, high = float(np.min(X)), float(np.max(X))
        output = "sigmoid" if 0.0 <= low and high <= 1.0 else "linear"
    torch.manual_seed(args.seed)
    model, X = _build_model(args, X, output)
    # A folder this run makes is removed again if it ends empty (the data or the model
    # refused, or Ctrl-C before the first epoch): a failed run leaves nothing behind.
    with made_folder(args.out) as out:
        return _fit_and_save(args, model, X, labels, name, out)


def _fit_and_save(args: argparse.Namespace, model: Any, X: Any, labels: Any, name: str, out: Path) -> int:
    """Fits or trains the model on X, saving the best weights and the History into `out`."""
    from ._atomic import atomic_write
    from .models import save_model
    from .training import train

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
                        progress=not args.no_progress and sys.stderr.isatty(), labels=labels,
                        metric_loss=args.metric_loss, **({"metric_weight": args.metric_weight}
                                                         if args.metric_loss else {}))
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
        print("  interrupted (Ctrl-C or SIGTERM): the best checkpoint is kept", file=sys.stderr)
        return 130
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors ("invalid int value: '...'", "invalid choice:
    '...'") show long values clipped (echoed). Its subcommands' parsers are of its class."""

    def parse_known_args(self, args=None, namespace=None):
        self._typed = list(sys.argv[1:] if args is None else args)  # (a subcommand's: its own)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        super().error(clip_typed(message, getattr(self, "_typed", sys.argv[1:])))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    demo.add_argument("--epochs", type=whole_number(1), default=None,
                      help="training epochs (default per model: vae 300, autoencoder 150, conv 60; "
                           "the metric-learned autoencoder 100)")
    demo.add_argument("-k", type=int, default=10, help="neighbours per digit (default 10)")
    demo.add_argument("--examples", type=whole_number(0), default=3, help="digits to show (default 3; 0: none)")
    demo.add_argument("--show", type=whole_number(1), default=None,
                      help="neighbours drawn per digit, at most -k (default 4, or -k when smaller)")
    demo.add_argument("--seed", type=seed_number, default=0, help="weights, training and shown digits (default 0)")
    demo.add_argument("--threads", type=thread_count, default=None,
                      help="threads for training and search (default: 1 for training, OpenMP's for search)")
    demo.add_argument("--out", default="latentspace-demo",
                      help="folder for the pictures (default ./latentspace-demo; created if missing)")
    demo.add_argument("--no-metric-learning", action="store_true",
                      help="skip the metric-learned autoencoder (a few seconds)")
    demo.set_defaults(run=command_demo, api_names=_DEMO_NAMES)

    trainer = sub.add_parser("train", help="train a latent model on digits or a data file, save it")
    trainer.add_argument("data", help="'digits' (bundled) or a .npy, .npz or ann-benchmarks .hdf5 file")
    trainer.add_argument("--model", choices=("pca", "autoencoder", "vae", "conv"), default="vae",
                         help="model kind (default vae)")
    trainer.add_argument("--latent-dim", type=int, default=8, help="latent dimensions (default 8)")
    trainer.add_argument("--epochs", type=int, default=100, help="at most this many epochs (default 100)")
    trainer.add_argument("--out", required=True, help="output folder: model.safetensors, history.json")
    trainer.add_argument("--key", default=None, help="array in an .npz (or hdf5 part; default train)")
    trainer.add_argument("--hidden", default=None, help="MLP hidden widths (default 256,128)")
    trainer.add_argument("--channels", default=None, help="conv channels (default 32,64)")
    trainer.add_argument("--image-shape", default=None, help="C,H,W of flattened images (conv)")
    trainer.add_argument("--beta", type=float, default=None, help="VAE KL weight (default 1)")
    trainer.add_argument("--kl-warmup", type=float, default=None, help="VAE KL warm-up epochs (default 0)")
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
    trainer.add_argument("--seed", type=seed_number, default=0, help="weights, split, shuffling (default 0)")
    trainer.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    trainer.add_argument("--threads", type=thread_count, default=None, help="torch and search threads")
    trainer.add_argument("--no-progress", action="store_true",
                         help="no progress bar (drawn on stderr only when it is a terminal)")
    trainer.add_argument("--metric-loss", choices=("supcon", "triplet"), default=None,
                         help="add a metric-learning term on the latent codes, with labels "
                              "(docs/metric_learning.md)")
    trainer.add_argument("--metric-weight", type=float, default=None,
                         help="weight of the metric term against reconstruction (default 5)")
    trainer.add_argument("--labels", default=None,
                         help="with --metric-loss: a .npy or .npz of integer labels, one per row (digits: their own)")
    trainer.add_argument("--labels-key", default=None,
                         help="the labels' array in the --labels .npz (default: its only one)")
    trainer.set_defaults(run=_command_train, api_names=_TRAIN_NAMES)

    _add_pipeline_commands(sub)
    _add_plot_commands(sub)
    return parser


def _as_typed(error: BaseException, args: argparse.Namespace) -> str:
    """The error's message naming what the user typed, not the Python API's parameter: each
    command's `api_names` (set with its parser) maps those names to its flags, or to a
    template of its arguments for a file ("{data}"). Long values it holds whole (the API's
    and the OS's words: "[Errno 2] No such file or directory: '...'") are clipped (echoed)."""
    names = {name: typed.format_map(vars(args)) for name, typed in getattr(args, "api_names", {}).items()}
    message = str(error)
    if isinstance(error, OSError) and error.filename is not None and error.strerror and message.startswith("[Errno"):
        # "[Errno 2] No such file or directory: 'x.npy'" as the shell words it: the file first.
        message = f"{os.fsdecode(error.filename)}: {error.strerror}"
    # The readers' and writers' "path: " is a parameter no command has; the rest of each such
    # message names the file ("path: m is a folder; pass a model file"), as the user typed it.
    return clip_typed(renamed(message.removeprefix("path: "), names), vars(args).values())


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `timeout`, `kill`) as an exception in the main thread. A
    KeyboardInterrupt, so that it unwinds as Ctrl-C does: the temporary files of atomic
    writes are removed (the default action would kill the process and leave them), and
    training stops with its best weights kept."""


_received = {"SIGTERM": False}  # whether this main() got one (train swallows the exception)


def _raise_terminated(signum, frame) -> None:
    _received["SIGTERM"] = True
    raise _Terminated()


def _on_sigterm_raise():
    """Installs _raise_terminated for SIGTERM; returns the handler to restore, or None where
    none is installed: outside the main thread (only it may), and where SIGTERM is ignored
    (the parent's choice, inherited: left as it is, as Python leaves an ignored SIGINT) or
    handled from C (not restorable)."""
    _received["SIGTERM"] = False  # (also where none is installed: this run cannot get one)
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_IGN, None):
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = getattr(args, "error_name", args.command)  # "index build", not just "index"
    previous = _on_sigterm_raise()
    try:
        code = args.run(args)
        if sys.stdout is not None:  # (None when started with no stdout: print() did nothing)
            sys.stdout.flush()  # a closed pipe fails here, inside the try, not at the interpreter's exit
        return 143 if _received["SIGTERM"] else code  # (train keeps its best weights, then returns)
    except BrokenPipeError:
        # stdout's reader has gone (`latentspace demo | head`): stop quietly with the status of a
        # tool killed by SIGPIPE, 128 + 13; stdout goes to devnull, or the exit's flush fails again
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # a stdout with no file descriptor (captured in tests)
            pass
        return 141
    except (ValueError, TypeError, OSError, ImportError) as error:
        print(f"latentspace {command}: error: {_as_typed(error, args)}", file=sys.stderr)
        return 2
    except (FloatingPointError, MemoryError) as error:  # training diverged; too large for memory
        print(f"latentspace {command}: error: {_as_typed(error, args)}", file=sys.stderr)
        return 1
    except _Terminated:
        print(f"latentspace {command}: terminated (SIGTERM)", file=sys.stderr)
        return 143  # 128 + SIGTERM, as for a process the signal killed
    except KeyboardInterrupt:
        print(f"latentspace {command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
