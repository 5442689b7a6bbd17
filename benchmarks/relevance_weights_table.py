"""Which relevance weights help the demo's VAE latent space (docs/similarity.md, cli_demo.py).

    python benchmarks/relevance_weights_table.py        # ~1 minute on 2 cores

Trains the demo's VAE (as `latentspace demo` does, one thread) for seeds 0, 1, 2 on the
stratified 70/30 digits split, scores its latent dimensions on the training codes
(Fisher / ANOVA F and mutual information), and prints held-out 10-NN label agreement for the
plain space and for relevance_weights(scores, power=p), as a markdown table.
"""

from __future__ import annotations

import torch

import latentspace as ls
from latentspace.cli_demo import DEMO_MODELS, _Split, demo_model
from latentspace.metrics import knn_label_agreement

SEEDS = (0, 1, 2)
POWERS = (0.25, 0.5, 1.0, 2.0)


def main() -> None:
    torch.set_num_threads(1)
    ls.set_num_threads(1)
    split = _Split()
    settings = DEMO_MODELS["vae"]
    columns = ["plain"] + [f"{method} p={p}" for method in ("fisher", "mutual_info") for p in POWERS]
    print("| seed | " + " | ".join(columns) + " |")
    print("|---:|" + "---:|" * len(columns))
    for seed in SEEDS:
        torch.manual_seed(seed)
        model = demo_model("vae", 8)
        ls.train(model, split.x_train, epochs=settings["epochs"], batch_size=settings["batch_size"],
                 lr=settings["lr"], val_fraction=0.1, early_stopping=None, seed=seed, device="cpu", progress=False)
        train_codes, test_codes = model.encode(split.x_train), model.encode(split.x_test)
        row = [knn_label_agreement(test_codes, split.y_test, k=10)]
        for method in ("fisher", "mutual_info"):
            scores = ls.relevance(train_codes, split.y_train, method=method)
            for power in POWERS:
                weights = ls.relevance_weights(scores, power=power)
                row.append(knn_label_agreement(test_codes, split.y_test, k=10, weights=weights))
        print(f"| {seed} | " + " | ".join(f"{v:.3f}" for v in row) + " |")


if __name__ == "__main__":
    main()
