"""Supervised shaping on the digits: held-out 10-NN label agreement with and without a metric term.

    python benchmarks/similarity_table.py                # seeds 0, 1, 2: a markdown table (~30 s)
    python benchmarks/similarity_table.py --seeds 0 --json out.json

The digits (latentspace.datasets.load_digits) are split 70/30, stratified, seed 0
(datasets.stratified_split). Every model sees only the 70%; the 30% are new points, encoded
by the trained encoder, and measured among themselves: 10-NN label agreement (squared L2,
self excluded: metrics.knn_label_agreement), reconstruction MSE per pixel
(metrics.reconstruction_mse) and trustworthiness at 10 neighbours of the codes against the
pixels (scikit-learn's manifold.trustworthiness). Training runs on one thread of torch and of
latentspace; its wall time is reported. `bench_similarity.py` runs the same measurement
under pytest-benchmark and checks the bar (metric-learned agreement >= 0.95 for every seed).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

import latentspace as ls
from latentspace import datasets
from latentspace.metrics import knn_label_agreement, reconstruction_mse
from latentspace.models import PCA, Autoencoder

K = 10
LATENT_DIM = 8
HIDDEN = (128,)  # the 64-128-8 autoencoder
BAR = 0.95  # the metric-learned space's held-out agreement, every seed
# Shared training settings (measured in docs/metric_learning.md): no early stopping, the best
# validation epoch kept.
TRAIN = dict(epochs=100, batch_size=64, lr=2e-3, val_fraction=0.1, early_stopping=None)
MODELS = {
    "autoencoder": dict(title="Autoencoder 64-128-8 (reconstruction only)"),
    "supcon": dict(title="Autoencoder 64-128-8 + supcon (weight 5, temperature 1)",
                   metric_loss="supcon", metric_weight=5.0, metric_temperature=1.0),
    "triplet": dict(title="Autoencoder 64-128-8 + triplet (weight 5, margin 1)",
                    metric_loss="triplet", metric_weight=5.0, metric_margin=1.0),
}


def digits_split():
    images, labels = datasets.load_digits()
    train_rows, test_rows = datasets.stratified_split(labels, test_fraction=0.3, seed=0)
    return images[train_rows], labels[train_rows], images[test_rows], labels[test_rows]


def trustworthiness(x: np.ndarray, z: np.ndarray) -> float:
    from sklearn.manifold import trustworthiness as sklearn_trustworthiness

    return float(sklearn_trustworthiness(x, z, n_neighbors=K))


def single_thread() -> None:
    torch.set_num_threads(1)
    ls.set_num_threads(1)


def measure_baselines(x_train, x_test, y_test) -> list[dict]:
    pca = PCA(LATENT_DIM).fit(x_train)
    z = pca.encode(x_test)
    return [
        dict(space="raw pixels", dims=x_test.shape[1], seed=None, agreement=knn_label_agreement(x_test, y_test, k=K),
             mse=0.0, trustworthiness=1.0, train_s=0.0),
        dict(space=f"PCA-{LATENT_DIM}", dims=LATENT_DIM, seed=None, agreement=knn_label_agreement(z, y_test, k=K),
             mse=reconstruction_mse(x_test, pca(x_test)), trustworthiness=trustworthiness(x_test, z), train_s=0.0),
    ]


def train_model(kind: str, seed: int, x_train, y_train):
    """(trained Autoencoder, History, seconds of latentspace.train on one thread)."""
    settings = {key: value for key, value in MODELS[kind].items() if key != "title"}
    if "metric_loss" in settings:
        settings["labels"] = y_train
    torch.manual_seed(seed)
    model = Autoencoder(x_train.shape[1], LATENT_DIM, hidden=HIDDEN, output="sigmoid")
    start = time.perf_counter()
    history = ls.train(model, x_train, seed=seed, device="cpu", progress=False, **TRAIN, **settings)
    return model, history, time.perf_counter() - start


def measure_model(kind: str, seed: int, split) -> dict:
    x_train, y_train, x_test, y_test = split
    model, history, seconds = train_model(kind, seed, x_train, y_train)
    z = model.encode(x_test)  # new points through the trained encoder
    return dict(space=MODELS[kind]["title"], kind=kind, dims=LATENT_DIM, seed=seed,
                agreement=knn_label_agreement(z, y_test, k=K), mse=reconstruction_mse(x_test, model(x_test)),
                trustworthiness=trustworthiness(x_test, z), train_s=seconds, best_epoch=history.best_epoch)


def measure(seeds=(0, 1, 2), kinds=tuple(MODELS)) -> list[dict]:
    single_thread()
    split = digits_split()
    rows = measure_baselines(split[0], split[2], split[3])
    for kind in kinds:
        for seed in seeds:
            rows.append(measure_model(kind, seed, split))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| space | dims | seed | held-out 10-NN label agreement | trustworthiness (10) "
             "| held-out reconstruction MSE | training, 1 thread |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        seed = "-" if r["seed"] is None else str(r["seed"])
        seconds = "-" if r["seed"] is None else f"{r['train_s']:.1f} s"
        lines.append(f"| {r['space']} | {r['dims']} | {seed} | {r['agreement']:.3f} | {r['trustworthiness']:.3f} "
                     f"| {r['mse']:.4f} | {seconds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated model seeds (default 0,1,2)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()
    seeds = tuple(int(s) for s in args.seeds.split(","))
    rows = measure(seeds)
    print(markdown(rows))
    shaped = [r["agreement"] for r in rows if r.get("kind") == "supcon"]
    print(f"\nbar: supcon agreement >= {BAR} for every seed: {'met' if min(shaped) >= BAR else 'MISSED'} "
          f"(min {min(shaped):.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
