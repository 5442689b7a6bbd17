"""Supervised shaping on the digits under pytest-benchmark: times latentspace.train (one thread)
for the plain and the metric-learned 64-128-8 autoencoders, seeds 0-2, records the held-out
figures in extra_info and checks the bar (supcon: held-out 10-NN label agreement >= 0.95).

    python -m pytest benchmarks/bench_similarity.py --benchmark-json=similarity.json   # ~40 s

The measurement itself lives in similarity_table.py (which prints the markdown table of
docs/metric_learning.md); nothing here asserts anything about speed.
"""

from __future__ import annotations

import pytest

import similarity_table as table

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def split():
    table.single_thread()
    return table.digits_split()


def test_baselines(benchmark, split):
    x_train, _, x_test, y_test = split
    rows = benchmark.pedantic(table.measure_baselines, args=(x_train, x_test, y_test), rounds=1, iterations=1)
    benchmark.extra_info.update({r["space"]: {k: r[k] for k in ("agreement", "mse", "trustworthiness")}
                                 for r in rows})


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("kind", list(table.MODELS))
def test_train_and_measure(benchmark, split, kind, seed):
    benchmark.group = f"similarity {kind}"
    x_train, y_train, x_test, y_test = split
    model, history, _ = benchmark.pedantic(table.train_model, args=(kind, seed, x_train, y_train),
                                           rounds=1, iterations=1)
    z = model.encode(x_test)
    agreement = table.knn_label_agreement(z, y_test, k=table.K)
    benchmark.extra_info.update(
        kind=kind, seed=seed, agreement=agreement,
        mse=table.reconstruction_mse(x_test, model(x_test)),
        trustworthiness=table.trustworthiness(x_test, z),
        epochs=history.epochs_run, best_epoch=history.best_epoch, settings={**table.TRAIN, **{
            k: v for k, v in table.MODELS[kind].items() if k != "title"}})
    if kind == "supcon":
        assert agreement >= table.BAR, f"seed {seed}: held-out agreement {agreement:.3f} < {table.BAR}"
