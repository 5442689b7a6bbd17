"""latentspace.train: lowers the loss, is reproducible with a seed on the CPU, keeps the best
checkpoint (also on Ctrl-C), stops early, shows progress, and refuses bad arguments."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import latentspace as ls
from latentspace import _training_checkpoint, _training_data
from latentspace.models import PCA, VAE, Autoencoder, ConvAutoencoder

pytestmark = pytest.mark.usefixtures("single_threaded")


from conftest import digits_400 as digits  # noqa: E402,F401  (a fixture, used by name)
from conftest import fit_briefly as _fit  # noqa: E402


@pytest.mark.parametrize("make", [
    lambda: Autoencoder(64, 4, hidden=(32,), output="sigmoid"),
    lambda: Autoencoder(64, 4, hidden=(32,)),
    lambda: VAE(64, 4, hidden=(32,)),
    lambda: ConvAutoencoder((1, 8, 8), 4, channels=(8,)),
], ids=["ae-bce", "ae-mse", "vae", "conv"])
def test_training_lowers_the_loss(digits, make):
    x, _ = digits
    torch.manual_seed(0)
    model = make()
    before = model.objective(torch.from_numpy(x), generator=torch.Generator().manual_seed(0))["loss"].item()
    history = _fit(model, x, epochs=8, early_stopping=None)
    after = model.objective(torch.from_numpy(x), generator=torch.Generator().manual_seed(0))["loss"].item()
    assert len(history.train_loss) == len(history.val_loss) == history.epochs_run == 8
    assert after < 0.8 * before
    assert history.train_loss[-1] < history.train_loss[0]
    assert history.val_loss[-1] < history.val_loss[0]
    assert history.best_epoch is not None and history.best_loss == min(history.val_loss)
    assert history.val_loss[history.best_epoch] == history.best_loss
    assert not model.training
    assert history.samples_per_second > 0 and history.seconds > 0 and history.device == "cpu"


def test_same_seed_same_weights(digits):
    x, _ = digits
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        model = VAE(64, 3, hidden=(16,), kl_warmup=1)
        history = _fit(model, x, epochs=3, seed=5)
        runs.append((model.state_dict(), history))
    (a, ha), (b, hb) = runs
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert ha.train_loss == hb.train_loss and ha.val_loss == hb.val_loss

    torch.manual_seed(7)
    other = VAE(64, 3, hidden=(16,), kl_warmup=1)
    _fit(other, x, epochs=3, seed=6)
    assert not all(torch.equal(a[key], other.state_dict()[key]) for key in a)


def test_best_weights_are_restored_and_checkpointed(digits, tmp_path):
    x, _ = digits
    torch.manual_seed(0)
    model = Autoencoder(64, 4, hidden=(32,), output="sigmoid")
    states = {}

    def remember_then_spoil(record):
        states[record["epoch"]] = {k: v.clone() for k, v in model.state_dict().items()}
        if record["epoch"] == 4:  # wreck the weights: the epochs after this one are worse
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn_like(parameter) * 3)

    path = tmp_path / "best.safetensors"
    history = _fit(model, x, epochs=8, early_stopping=None, checkpoint=path, callback=remember_then_spoil)
    assert history.best_epoch == 4 and history.epochs_run == 8
    best = history.best_epoch
    assert history.best_loss == min(history.val_loss)
    for key, value in model.state_dict().items():
        assert torch.equal(value, states[best][key]), key
    saved = ls.load_model(path)
    np.testing.assert_array_equal(saved.encode(x), model.encode(x))
    assert history.checkpoint == str(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors"]


def test_early_stopping_stops_after_patience(digits):
    x, _ = digits
    torch.manual_seed(0)
    model = Autoencoder(64, 4, hidden=(32,))
    history = _fit(model, x, epochs=200, lr=0.3, early_stopping=2)  # diverging steps: no progress
    assert history.stopped_early
    assert history.epochs_run < 200
    assert history.epochs_run - 1 - history.best_epoch == 2
    assert all(v >= history.best_loss for v in history.val_loss[history.best_epoch + 1:])


def test_without_validation_the_training_loss_is_monitored(digits):
    x, _ = digits
    history = _fit(Autoencoder(64, 4, hidden=(16,)), x, epochs=3, val_fraction=0.0)
    assert history.monitor == "train_loss" and history.val_loss == []
    assert history.best_loss == min(history.train_loss)


def test_warmup_epochs_are_not_picked_as_best(digits):
    x, _ = digits
    torch.manual_seed(0)
    history = _fit(VAE(64, 3, hidden=(16,), kl_warmup=3), x, epochs=5, early_stopping=1)
    assert history.best_epoch >= 2  # epochs 0 and 1 end before the warm-up is over
    assert history.epochs_run >= 4  # patience only counts after the warm-up
    short = _fit(VAE(64, 3, hidden=(16,), kl_warmup=10), x, epochs=2)
    assert short.best_epoch == 1  # a run shorter than the warm-up keeps its last epoch


def test_without_validation_an_epoch_trained_partly_in_the_warm_up_is_not_best(digits):
    """With val_fraction=0 the training loss picks the best epoch, and it averages the epoch's
    batches, each with the KL weight of its moment: an epoch that began in the warm-up has a
    loss deflated by its lower weights. Epoch 1 of a 2-epoch warm-up (weights 0.5 to 1) was
    picked as best, early stopping then ended the run, and the model came back with those
    weights although every later epoch kept improving under the final objective."""
    x, _ = digits
    torch.manual_seed(0)
    model = VAE(64, 4, hidden=(32,), kl_warmup=2)
    with torch.no_grad():
        model.encoder[-1].bias[:4] = 5.0  # a posterior far from the prior: a large KL term
    history = _fit(model, x, epochs=8, lr=1e-4, val_fraction=0.0, early_stopping=3)
    assert history.best_epoch >= 2  # epoch 2 is the first one trained at full weight throughout
    final = history.train_loss[2:]
    assert history.best_loss == min(final) and history.best_epoch == 2 + final.index(min(final))


def test_ctrl_c_keeps_the_best_checkpoint_and_returns(digits, tmp_path):
    x, _ = digits
    torch.manual_seed(0)
    model = Autoencoder(64, 4, hidden=(32,), output="sigmoid")
    path = tmp_path / "best.safetensors"
    seen = []

    def interrupt_at_epoch_3(record):
        seen.append(record["epoch"])
        if record["epoch"] == 3:
            raise KeyboardInterrupt

    history = _fit(model, x, epochs=50, early_stopping=None, checkpoint=path, callback=interrupt_at_epoch_3)
    assert history.interrupted and not history.stopped_early
    assert seen == [0, 1, 2, 3] and history.epochs_run == 4
    assert history.best_epoch == int(np.argmin(history.val_loss))
    saved = ls.load_model(path)
    np.testing.assert_array_equal(saved.encode(x), model.encode(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.safetensors"]


def test_ctrl_c_mid_epoch(digits, tmp_path, monkeypatch):
    """KeyboardInterrupt from inside a batch (as from the keyboard): the epoch in progress is
    dropped, the best completed one is kept."""
    x, _ = digits
    torch.manual_seed(0)
    model = Autoencoder(64, 4, hidden=(32,))
    steps = {"n": 0}
    real_objective = model.objective

    def objective(*args, **kwargs):
        steps["n"] += torch.is_grad_enabled()  # training batches only, not validation
        if steps["n"] == 14:  # 6 batches per epoch: in the middle of epoch 2
            raise KeyboardInterrupt
        return real_objective(*args, **kwargs)

    monkeypatch.setattr(model, "objective", objective)
    path = tmp_path / "m.safetensors"
    history = _fit(model, x, epochs=10, checkpoint=path)
    assert history.interrupted and history.epochs_run == 2
    assert history.best_epoch in (0, 1)
    np.testing.assert_array_equal(ls.load_model(path).encode(x), model.encode(x))


def test_ctrl_c_during_a_checkpoint_write_keeps_the_previous_one(digits, tmp_path, monkeypatch):
    x, _ = digits
    torch.manual_seed(0)
    model = Autoencoder(64, 4, hidden=(32,), output="sigmoid")
    path = tmp_path / "m.safetensors"
    real_save = _training_checkpoint.save_model
    calls = {"n": 0}

    def flaky_save(m, p):
        calls["n"] += 1
        if calls["n"] == 2:  # the second best epoch's write is interrupted
            raise KeyboardInterrupt
        real_save(m, p)

    monkeypatch.setattr(_training_checkpoint, "save_model", flaky_save)
    history = _fit(model, x, epochs=10, early_stopping=None, checkpoint=path)
    assert history.interrupted
    # the interrupted write was redone at the end: the file holds the model's final weights
    np.testing.assert_array_equal(ls.load_model(path).encode(x), model.encode(x))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_ctrl_c_before_the_first_epoch_writes_nothing(digits, tmp_path):
    x, _ = digits

    model = Autoencoder(64, 4, hidden=(8,))  # (not a subclass: checkpoint= needs a class save_model knows)
    model.objective = lambda *args, **kwargs: _raise(KeyboardInterrupt)
    path = tmp_path / "m.safetensors"
    history = _fit(model, x, checkpoint=path)
    assert history.interrupted and history.epochs_run == 0 and history.best_epoch is None
    assert not path.exists() and history.checkpoint is None


def test_divergence_raises_after_restoring_the_best(digits, tmp_path):
    x, _ = digits
    torch.manual_seed(0)
    model = Autoencoder(64, 4, hidden=(16,))
    calls = {"n": 0}
    real = model.objective

    def poisoned(*args, **kwargs):
        calls["n"] += torch.is_grad_enabled()  # training batches only, not validation
        out = real(*args, **kwargs)
        if calls["n"] > 18:  # 6 batches per epoch: from epoch 3 on
            out["loss"] = out["loss"] * float("nan")
        return out

    model.objective = poisoned
    path = tmp_path / "m.safetensors"
    with pytest.raises(FloatingPointError, match="training diverged: the training loss became nan in epoch 3"):
        _fit(model, x, epochs=10, checkpoint=path)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    np.testing.assert_array_equal(ls.load_model(path).encode(x), model.encode(x))


def test_divergence_before_any_epoch_puts_the_given_weights_back():
    """Data whose squares overflow float32 made the first epoch's loss inf: the model was left
    with NaN weights (every later encode refused it). Now the weights it was given are back."""
    torch.manual_seed(0)
    model = Autoencoder(6, 2, hidden=(8,))
    before = {key: value.clone() for key, value in model.state_dict().items()}
    x = np.full((64, 6), 3e38, np.float32)
    x[::2] *= -1
    with pytest.raises(FloatingPointError, match="training diverged: the training loss became inf in epoch 0; no "
                                                 "epoch finished cleanly, so the weights the model had before"):
        ls.train(model, x, epochs=2, progress=False)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert np.isfinite(model.encode(np.ones((3, 6), np.float32))).all()


def _interrupt_or_poison(model, when, action):
    """Wraps model.objective: `action(out)` on the training batches (gradients on) for which
    when(call number from 1, progress) holds."""
    calls = {"n": 0}
    real = model.objective

    def objective(*args, **kwargs):
        calls["n"] += torch.is_grad_enabled()  # training batches only, not validation
        out = real(*args, **kwargs)
        if torch.is_grad_enabled() and when(calls["n"], kwargs.get("progress")):
            action(out)
        return out

    model.objective = objective


def _remember_epochs(model, states):
    return lambda record: states.__setitem__(record["epoch"], {k: v.clone() for k, v in model.state_dict().items()})


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _raise(error):
    raise error


def test_nan_weights_left_by_an_epochs_last_step_are_not_kept_as_best(digits, tmp_path):
    """Without validation the training loss, averaged over the batches before their steps,
    picks the best epoch: a step with NaN gradients on an epoch's last batch left NaN weights
    under a finite epoch loss. They were kept as the best and checkpointed, and the divergence
    of the next epoch 'restored the best' NaN weights."""
    x, _ = digits
    torch.manual_seed(0)
    model = Autoencoder(64, 4, hidden=(16,))
    weight = next(model.parameters())
    # 400 rows in batches of 64: 7 steps per epoch, the 14th is epoch 1's last. sqrt(0 * w)
    # adds 0 to the loss and NaN to the gradients (d sqrt(u)/du = inf at u = 0, times 0).
    _interrupt_or_poison(model, lambda n, _: n == 14,
                         lambda out: out.__setitem__("loss", out["loss"] + torch.sqrt(0 * weight.sum())))
    states = {}
    path = tmp_path / "m.safetensors"
    with pytest.raises(FloatingPointError, match=r"the weights became NaN or Inf in epoch 1 .*; the weights of "
                       "epoch 0, the best, were restored and checkpointed"):
        _fit(model, x, epochs=5, val_fraction=0.0, checkpoint=path, callback=_remember_epochs(model, states))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert _same_weights(model.state_dict(), states[0])
    assert _same_weights(ls.load_model(path).state_dict(), states[0])


def test_ctrl_c_mid_epoch_in_the_warm_up_keeps_the_last_finished_epoch(digits, tmp_path):
    """Ctrl-C in epoch 3 of a VAE's KL warm-up: the model and checkpoint hold epoch 2's
    weights as it ended, not the half-trained ones of the moment."""
    x, _ = digits
    torch.manual_seed(0)
    model = VAE(64, 3, hidden=(16,), kl_warmup=10)
    _interrupt_or_poison(model, lambda n, _: n == 3 * 6 + 4, lambda out: _raise(KeyboardInterrupt))  # 6 batches/epoch
    states = {}
    path = tmp_path / "m.safetensors"
    history = _fit(model, x, epochs=20, checkpoint=path, callback=_remember_epochs(model, states))
    assert history.interrupted and history.epochs_run == 3 and history.best_epoch == 2
    assert history.best_loss == history.val_loss[2]
    assert _same_weights(model.state_dict(), states[2])
    assert _same_weights(ls.load_model(path).state_dict(), states[2])


def test_divergence_in_the_warm_up_restores_the_last_finished_epoch(digits, tmp_path):
    x, _ = digits
    torch.manual_seed(0)
    model = VAE(64, 3, hidden=(16,), kl_warmup=5)
    _interrupt_or_poison(model, lambda _, progress: progress > 2.0,  # from epoch 2 on
                         lambda out: out.__setitem__("loss", out["loss"] * float("nan")))
    states = {}
    path = tmp_path / "m.safetensors"
    with pytest.raises(FloatingPointError, match="in epoch 2; the weights of epoch 1, the last finished one "
                       r"\(the KL warm-up was not over\), were restored and checkpointed"):
        _fit(model, x, epochs=10, checkpoint=path, callback=_remember_epochs(model, states))
    assert all(torch.isfinite(p).all() for p in model.parameters()) and not model.training
    assert _same_weights(model.state_dict(), states[1])
    assert _same_weights(ls.load_model(path).state_dict(), states[1])


def test_an_error_in_callback_restores_the_best_then_propagates(digits, tmp_path):
    x, _ = digits
    torch.manual_seed(0)
    model = Autoencoder(64, 4, hidden=(32,), output="sigmoid")
    states = {}
    error = ValueError("callback failed")

    def spoil_then_fail(record):
        states[record["epoch"]] = {k: v.clone() for k, v in model.state_dict().items()}
        if record["epoch"] == 4:  # the best is epoch 4 at the latest; the weights are wrecked, then it fails
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn_like(parameter) * 3)
            raise error

    path = tmp_path / "m.safetensors"
    with pytest.raises(ValueError) as raised:
        _fit(model, x, epochs=8, early_stopping=None, checkpoint=path, callback=spoil_then_fail)
    assert raised.value is error and not model.training
    saved = ls.load_model(path).state_dict()
    assert _same_weights(model.state_dict(), saved)
    assert any(_same_weights(saved, state) for state in states.values())  # an epoch's weights, unspoilt


def test_an_error_in_the_warm_up_keeps_the_last_epoch_and_a_failed_restore_hides_nothing(digits, tmp_path,
                                                                                         monkeypatch):
    x, _ = digits
    torch.manual_seed(0)
    model = VAE(64, 3, hidden=(16,), kl_warmup=10)
    states = {}
    remember = _remember_epochs(model, states)

    def fail_at_epoch_1(record):
        remember(record)
        if record["epoch"] == 1:  # the weights are wrecked, then it fails
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(torch.randn_like(parameter) * 3)
            raise RuntimeError("callback failed")

    def full_disk(m, p):
        raise OSError("disk full")

    monkeypatch.setattr(_training_checkpoint, "save_model", full_disk)  # the restore's checkpoint write fails
    with pytest.raises(RuntimeError, match="callback failed") as raised:
        _fit(model, x, epochs=5, checkpoint=tmp_path / "m.safetensors", callback=fail_at_epoch_1)
    assert _same_weights(model.state_dict(), states[1]) and not model.training
    if hasattr(raised.value, "__notes__"):  # Python 3.11+
        assert "OSError: disk full" in raised.value.__notes__[0]


def test_a_copy_cut_short_is_completed_from_the_model():
    model = Autoencoder(8, 2, hidden=(4,))
    kept = _training_checkpoint.KeptWeights()
    kept.keep(model, 0, 1.0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    real_state_dict = model.state_dict

    class CutShort(dict):
        def items(self):
            yield from list(super().items())[:1]
            raise KeyboardInterrupt

    model.state_dict = lambda: CutShort(real_state_dict())
    with pytest.raises(KeyboardInterrupt):
        kept.keep(model, 1, 0.5)
    assert kept.epoch is None  # half copied: not labelled as either epoch
    model.state_dict = real_state_dict
    kept.settle(model)
    assert (kept.epoch, kept.loss) == (1, 0.5) and _same_weights(kept.state, model.state_dict())


def test_checkpoint_needs_a_model_save_model_can_write(digits, tmp_path):
    x, _ = digits

    class MyAE(Autoencoder):
        calls = 0

        def objective(self, *args, **kwargs):
            MyAE.calls += 1
            return super().objective(*args, **kwargs)

    path = tmp_path / "m.safetensors"
    with pytest.raises(TypeError, match="model: checkpoint= saves with latentspace.save_model, which takes only "
                       "PCA, Autoencoder, VAE, ConvAutoencoder, got MyAE"):
        _fit(MyAE(64, 4, hidden=(8,)), x, checkpoint=path)
    assert MyAE.calls == 0 and not path.exists()  # refused before any training
    assert _fit(MyAE(64, 4, hidden=(8,)), x, epochs=1).epochs_run == 1  # without checkpoint= it trains


def test_progress_bar_shows_epoch_losses_and_speed(digits, capsys):
    x, _ = digits
    _fit(Autoencoder(64, 4, hidden=(16,)), x, epochs=2, progress=True)
    err = capsys.readouterr().err
    assert "Autoencoder" in err and "epoch 2/2" in err
    assert "train " in err and "val " in err and "samples/s" in err


def test_memory_mapped_and_torch_data(digits, tmp_path):
    x, _ = digits
    np.save(tmp_path / "x.npy", x)
    mapped = ls.datasets.load_npy(tmp_path / "x.npy", mmap=True)
    results = []
    for data in (x, mapped, torch.from_numpy(x), x.astype(np.float64)):
        torch.manual_seed(0)
        model = Autoencoder(64, 4, hidden=(16,))
        _fit(model, data, epochs=2)
        results.append(model.encode(x))
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [">f4", ">f8", np.longdouble], ids=["big-endian-f4", "big-endian-f8",
                                                                       "longdouble"])
def test_data_torch_cannot_wrap_trains_as_in_memory(digits, tmp_path, dtype):
    """Big-endian data (a .npy written on another machine) and long double: torch.from_numpy
    takes neither. A memory map of big-endian data failed at the first batch with torch's
    'given numpy array has byte order different from the native byte order' (naming no
    argument), although the same array in memory trained; long double failed either way,
    although encode() takes it."""
    x, _ = digits
    np.save(tmp_path / "x.npy", x.astype(dtype))
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    results = []
    for data in (x, x.astype(dtype), mapped):
        torch.manual_seed(0)
        model = Autoencoder(64, 4, hidden=(16,))
        _fit(model, data, epochs=2)
        results.append(model.encode(x))
    for other in results[1:]:
        np.testing.assert_allclose(other, results[0], rtol=1e-5, atol=1e-6)


def test_batches_gathered_from_large_data_match_resident_data(digits, monkeypatch):
    x, _ = digits
    torch.manual_seed(0)
    resident = Autoencoder(64, 4, hidden=(16,))
    _fit(resident, x.astype(np.float64), epochs=2)
    monkeypatch.setattr(_training_data, "RESIDENT_MAX_BYTES", 0)  # float64 numpy and torch: gathered
    for data in (x.astype(np.float64), torch.from_numpy(x).double()):
        torch.manual_seed(0)
        gathered = Autoencoder(64, 4, hidden=(16,))
        _fit(gathered, data, epochs=2)
        np.testing.assert_allclose(gathered.encode(x), resident.encode(x), rtol=1e-5, atol=1e-6)


def test_checking_wide_data_needs_a_bounded_amount_of_memory():
    """X is checked (finite, within the model's dtype) in chunks of 65,536 rows whatever their
    width: float64 data for a float32 model took |X| of a whole chunk in float64 and a
    boolean mask beside it, more memory than the data itself for 1,024 rows of 16,384
    features (a torch tensor's chunk was copied to float64 too). Checked in chunks of a
    fixed number of bytes, the temporaries stay well below the data's size."""
    import tracemalloc

    X = np.random.default_rng(0).random((1024, 16384))  # float64, 128 MiB
    model = Autoencoder(16384, 2, hidden=(2,))
    tracemalloc.start()  # numpy's allocations are traced; the data is used in place
    try:
        _training_data.TrainingData(X, model, "mse", torch.device("cpu"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < X.nbytes / 2


def test_conv_trains_on_images_and_flat_rows(digits):
    x, _ = digits
    for data in (x, x.reshape(-1, 1, 8, 8)):
        torch.manual_seed(0)
        history = _fit(ConvAutoencoder((1, 8, 8), 4, channels=(4,)), data, epochs=2)
        assert history.epochs_run == 2 and all(map(math.isfinite, history.train_loss))


def test_bf16_autocast_on_the_cpu(digits):
    x, _ = digits
    torch.manual_seed(0)
    model = VAE(64, 4, hidden=(32,))
    history = _fit(model, x, epochs=3, autocast=True, early_stopping=None)
    assert all(map(math.isfinite, history.train_loss))
    assert history.train_loss[-1] < history.train_loss[0]
    assert next(model.parameters()).dtype == torch.float32  # weights stay float32


def test_a_float16_model_is_refused_before_training(digits):
    # AdamW's float16 second moments underflow: the run diverged at once and the message
    # blamed lr. bfloat16 trains (its range is float32's).
    x, _ = digits
    torch.manual_seed(0)
    model = Autoencoder(64, 4, hidden=(32,)).half()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(TypeError, match=r"model: its parameters are float16, which AdamW cannot train .* "
                                        r"convert with \.half\(\) afterwards"):
        _fit(model, x, epochs=2)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    history = _fit(Autoencoder(64, 4, hidden=(32,)).to(torch.bfloat16), x, epochs=2, early_stopping=None)
    assert all(map(math.isfinite, history.train_loss))


def test_bad_arguments(digits, tmp_path):
    x, _ = digits
    model = Autoencoder(64, 4, hidden=(8,))
    cases = [
        (dict(epochs=0), ValueError, "epochs: expected an integer >= 1, got 0"),
        (dict(epochs=2.5), TypeError, "epochs: expected an integer"),
        (dict(batch_size=0), ValueError, "batch_size: expected an integer >= 1"),
        (dict(lr=0.0), ValueError, r"lr: expected a finite number in \(0, inf\]"),
        (dict(lr=float("nan")), ValueError, "lr: expected a finite number"),
        (dict(weight_decay=-1.0), ValueError, "weight_decay: expected a finite number"),
        (dict(val_fraction=1.0), ValueError, r"val_fraction: expected a finite number in \[0, 1\)"),
        (dict(early_stopping=-1), ValueError, "early_stopping: expected an integer >= 0"),
        (dict(seed=-1), ValueError, r"seed: expected an integer in \[0, 9223372036854775808\), got -1"),
        (dict(seed=2**63), ValueError, r"seed: expected an integer in \[0, 9223372036854775808\)"),
        (dict(seed=2**70), ValueError, r"seed: expected an integer in \[0, 9223372036854775808\)"),
        (dict(device="tpu"), ValueError, "device: expected 'auto', 'cpu', 'cuda'"),
        (dict(loss="l1"), ValueError, "loss: expected one of"),
        (dict(loss="bce"), ValueError, "loss: 'bce' needs a model whose output is a probability"),
        (dict(autocast="yes"), TypeError, "autocast: expected True, False or None"),
        (dict(checkpoint=tmp_path), ValueError, "checkpoint: .* is a folder"),
        (dict(checkpoint=tmp_path / "no" / "m.st"), ValueError, "checkpoint: cannot write .*: folder .* does not exist"),
        # The OS said only "[Errno 36] File name too long", at the first best epoch's save.
        (dict(checkpoint=tmp_path / ("m" * 300 + ".safetensors")), ValueError,
         r"checkpoint: file name too long \(312 characters in one path component; the file system allows \d+\)"),
        (dict(checkpoint=5), TypeError, r"checkpoint: expected a file path \(str or os.PathLike\), got int 5"),
        (dict(checkpoint=str(tmp_path / "m.st").encode()), TypeError,
         r"checkpoint: expected a file path \(str or os.PathLike\), got bytes b'"),
        (dict(callback=3), TypeError, "callback: expected a callable"),
        (dict(progress="no"), TypeError, "progress: expected True or False, got 'no'"),  # "no" showed a bar
        (dict(progress=None), TypeError, "progress: expected True or False, got None"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            _fit(model, x, **kwargs)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA GPU"):
            _fit(model, x, device="cuda")


def test_bad_data(digits):
    x, _ = digits
    model = Autoencoder(64, 4, hidden=(8,))
    with pytest.raises(ValueError, match=r"X: expected shape \(n, 64\) for this Autoencoder, got \(400, 63\)"):
        _fit(model, x[:, :63])
    with pytest.raises(ValueError, match=r"X: expected shape \(n, 64\)"):
        _fit(model, x[0])
    with pytest.raises(TypeError, match="X: expected a real numeric dtype"):
        _fit(model, x > 0.5)
    with pytest.raises(TypeError, match="X: expected a numpy array or torch tensor"):
        _fit(model, "digits.npy")
    bad = x.copy()
    bad[123, 5] = np.inf
    with pytest.raises(ValueError, match="X: row 123 contains NaN or Inf"):
        _fit(model, bad)
    huge = x.astype(np.float64)
    huge[77, 3] = 1e39  # finite in float64, inf in the model's float32
    with pytest.raises(ValueError, match=r"X: row 77 has values beyond float32's range \(\|x\| > 3\.403e\+38\)"):
        _fit(model, huge)
    with pytest.raises(ValueError, match="X: expected a CPU or CUDA tensor, got one on 'meta'"):
        _fit(model, torch.ones(400, 64, device="meta"))
    with pytest.raises(ValueError, match=r"X: loss='bce' needs data in \[0, 1\].*values in \[-1, 1\]"):
        _fit(VAE(64, 4, hidden=(8,)), x * 2 - 1)
    with pytest.raises(ValueError, match="X: 1 rows leave none for training"):
        _fit(model, x[:1])
    with pytest.raises(TypeError, match=r"PCA is fitted in closed form.*model.fit\(X\)"):
        _fit(PCA(4), x)
    with pytest.raises(TypeError, match="model: expected an Autoencoder, VAE or ConvAutoencoder"):
        _fit(torch.nn.Linear(64, 4), x)


@pytest.mark.parametrize("data", ["float32", "float64"])
def test_a_float64_model_trains_in_float64(digits, data):
    """A model converted with .double() gets its batches in float64 (not float32, which its
    layers refuse), keeps float64 weights, and lowers its loss."""
    x, _ = digits
    torch.manual_seed(0)
    model = Autoencoder(64, 4, hidden=(16,)).double()
    before = model.objective(torch.from_numpy(x).double())["loss"].item()
    history = _fit(model, x.astype(data), epochs=4)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.objective(torch.from_numpy(x).double())["loss"].item() < before
    assert all(np.isfinite(history.train_loss))


def test_history_to_dict_is_json_ready(digits):
    import json

    x, _ = digits
    history = _fit(Autoencoder(64, 4, hidden=(8,)), x, epochs=2)
    data = json.loads(json.dumps(history.to_dict()))
    assert data["epochs_run"] == 2 and len(data["train_loss"]) == 2 and data["seed"] == 0


def test_samples_per_second_counts_only_the_epochs_run(digits):
    """Ctrl-C during an epoch's validation pass drops that epoch (epochs_run does not count
    it), but its training time was counted: samples_per_second came out a third low after
    two epochs."""
    x, _ = digits
    torch.manual_seed(0)
    model = Autoencoder(64, 4, hidden=(16,))
    validations = {"n": 0}
    real = model.objective

    def objective(*args, **kwargs):
        validations["n"] += not torch.is_grad_enabled()
        if validations["n"] == 3:  # epoch 2's validation pass (40 rows: one batch)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    model.objective = objective
    records = []
    history = _fit(model, x, epochs=10, callback=records.append)
    assert history.interrupted and history.epochs_run == len(records) == 2
    trained_rows = len(x) - round(0.1 * len(x))
    assert history.samples_per_second == 2 * trained_rows / sum(r["seconds"] for r in records)


def test_public_api_is_lazy_and_train_stays_a_function():
    """`import latentspace` does not load torch; latentspace.train is the function even
    after the modules behind it are imported in any order."""
    import subprocess
    import sys

    code = ("import sys, latentspace as ls; assert 'torch' not in sys.modules; "
            "import latentspace.cli, latentspace.training, latentspace.models; "
            "assert callable(ls.train) and ls.train.__module__ == 'latentspace.training'; "
            "assert ls.VAE is ls.models.VAE and ls.save_model is ls.models.save_model; "
            "assert set(ls.__all__) <= set(dir(ls)); print('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_a_history_prints_in_one_line(digits):
    """print(history) showed every epoch's losses (the dataclass's repr): a hundred-epoch run
    filled the screen. One line now; the lists are still its fields."""
    x, _ = digits
    history = _fit(Autoencoder(64, 4, hidden=(8,)), x, epochs=3)
    text = repr(history)
    assert "\n" not in text and len(text) < 250, text
    assert text.startswith("History(3 epochs completed, best epoch ") and "samples/s" in text
    assert "train_loss=[" not in text and "val_loss=[" not in text
    assert len(history.train_loss) == 3


def test_a_model_with_nothing_to_train_is_refused_by_name(digits):
    """A model whose parameters are all frozen (requires_grad=False) failed in the first
    batch's backward with torch's "element 0 of tensors does not require grad", naming
    nothing; frozen parts of a model still train the rest."""
    x, _ = digits
    model = Autoencoder(64, 4, hidden=(8,))
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with pytest.raises(ValueError, match="model: none of its parameters requires grad"):
        _fit(model, x)
    model.decoder.requires_grad_(True)  # the encoder frozen, the decoder trained
    before = model.encoder[0].weight.clone()
    _fit(model, x, epochs=1)
    assert torch.equal(model.encoder[0].weight, before)


def test_masked_data_is_refused_as_pca_fit_and_encode_refuse_it(digits):
    """A masked array trained on its masked entries' values (np.asarray drops the mask),
    silently, where PCA.fit and encode refuse one."""
    x, _ = digits
    masked = np.ma.masked_array(x, mask=x > 0.9)
    with pytest.raises(TypeError, match="X: a masked array with masked entries"):
        _fit(Autoencoder(64, 4, hidden=(8,)), masked)
    _fit(Autoencoder(64, 4, hidden=(8,)), np.ma.masked_array(x), epochs=1)  # nothing masked: its data


@pytest.mark.parametrize("make", [lambda x: (row for row in x), lambda x: iter(x), lambda x: {0: x}],
                         ids=["generator", "iterator", "dict"])
def test_data_that_is_no_array_is_named_as_such(digits, make):
    """A generator of rows read as "X: expected a real numeric dtype, got object": np.asarray
    makes a 0-d object array of it. What X must be is said instead."""
    x, _ = digits
    with pytest.raises(TypeError, match=r"X: expected a numpy array, memory map or torch tensor of shape "
                                        r"\(n, 64\), got (generator|iterator|dict)"):
        _fit(Autoencoder(64, 4, hidden=(8,)), make(x))


def test_a_checkpoint_over_the_memory_mapped_data_is_refused(digits, tmp_path):
    """checkpoint= naming the file X is memory-mapped from replaced the user's data with the
    model at the first best epoch."""
    x, _ = digits
    path = tmp_path / "digits.npy"
    np.save(path, x)
    data = np.load(path, mmap_mode="r")
    for mapped in (data, data[:300]):  # a slice of the map is mapped from the same file
        with pytest.raises(ValueError, match="checkpoint: .*digits.npy is the file X is memory-mapped from"):
            _fit(Autoencoder(64, 4, hidden=(8,)), mapped, checkpoint=str(tmp_path / "." / "digits.npy"))
    assert np.array_equal(np.load(path), x)
    _fit(Autoencoder(64, 4, hidden=(8,)), data, epochs=1, checkpoint=tmp_path / "model.safetensors")


def test_a_model_with_nan_weights_is_refused_before_training(digits):
    """A model holding NaN weights (a failed run's, say) trained into "training diverged ...
    Lower lr", an advice that could not help."""
    x, _ = digits
    model = Autoencoder(64, 4, hidden=(8,))
    with torch.no_grad():
        model.decoder[-1].bias[3] = float("nan")
    with pytest.raises(ValueError, match=r"model: its weights hold NaN or Inf \(decoder.2.bias\) before training"):
        _fit(model, x)


def test_data_that_turns_nan_during_training_is_named(digits, tmp_path):
    """A memory map written while the model trains on it (the rows are read each epoch) made
    the loss NaN, reported as "Lower lr ... or check the data's scale": the row is named."""
    x, _ = digits
    path = tmp_path / "digits.npy"
    np.save(path, x)
    data = np.load(path, mmap_mode="r+")
    torch.manual_seed(0)
    model = Autoencoder(64, 4, hidden=(8,))

    def spoil(record):
        if record["epoch"] == 1:
            data[123, 5] = np.nan

    with pytest.raises(FloatingPointError, match=r"X: row 123 contains NaN or Inf now, not when training "
                                                 r"started .*the weights of epoch 1, the best, were restored"):
        _fit(model, data, epochs=5, callback=spoil)
    assert not model.training and all(torch.isfinite(p).all() for p in model.parameters())
