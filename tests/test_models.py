"""The latent models: one interface (encode, decode, forward, latent_dim), PCA against
scikit-learn, the convolutional model on 8x8 and 28x28 images, and input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import latentspace as ls
from latentspace._memory_limit import MemoryLimit
from latentspace.models import PCA, VAE, Autoencoder, ConvAutoencoder, LatentModel
from latentspace.models import pca as pca_module

pytestmark = pytest.mark.usefixtures("single_threaded")


def _models():
    """One small instance of every model kind, with its per-sample input shape."""
    torch.manual_seed(0)
    return [
        (Autoencoder(12, 3, hidden=(16,)), (12,)),
        (Autoencoder(12, 3, hidden=(), output="sigmoid"), (12,)),
        (VAE(12, 3, hidden=(16, 8)), (12,)),
        (ConvAutoencoder((1, 8, 8), 4, channels=(4, 8)), (1, 8, 8)),
        (ConvAutoencoder((3, 7, 5), 2, channels=(4,)), (3, 7, 5)),
    ]


@pytest.fixture
def fitted_pca(rng):
    return PCA(3).fit(rng.random((40, 12)))


# ---------------------------------------------------------------------------------------
# The shared interface


@pytest.mark.parametrize("index", range(5))
def test_interface_shapes_and_types(rng, index):
    model, shape = _models()[index]
    assert isinstance(model, LatentModel) and isinstance(model, torch.nn.Module)
    assert model.input_shape == shape
    x = rng.random((7, *shape)).astype(np.float32)
    z = model.encode(x)
    assert isinstance(z, np.ndarray) and z.dtype == np.float32 and z.shape == (7, model.latent_dim)
    x_hat = model.decode(z)
    assert isinstance(x_hat, np.ndarray) and x_hat.shape == (7, *shape)
    recon = model(x)
    assert isinstance(recon, np.ndarray) and recon.shape == x.shape
    np.testing.assert_allclose(recon, x_hat, rtol=1e-5, atol=1e-6)

    # torch in, torch out, differentiable
    xt = torch.from_numpy(x).requires_grad_(True)
    zt = model.encode(xt)
    assert isinstance(zt, torch.Tensor) and zt.requires_grad
    np.testing.assert_allclose(zt.detach().numpy(), z, rtol=1e-5, atol=1e-6)
    model(xt).sum().backward()
    assert xt.grad is not None and torch.isfinite(xt.grad).all()


def test_pca_interface(fitted_pca, rng):
    x = rng.random((5, 12))
    z = fitted_pca.encode(x)
    assert z.shape == (5, 3) and z.dtype == np.float32
    assert fitted_pca.decode(z).shape == (5, 12)
    assert fitted_pca.latent_dim == 3 and fitted_pca.input_shape == (12,)
    zt = fitted_pca.encode(torch.from_numpy(x).float())
    assert isinstance(zt, torch.Tensor)
    np.testing.assert_allclose(zt.numpy(), z, rtol=1e-5, atol=1e-6)


def test_other_real_dtypes_are_converted(rng):
    model, _ = _models()[0]
    x = rng.random((4, 12))
    expected = model.encode(x.astype(np.float32))
    np.testing.assert_allclose(model.encode(x), expected, rtol=1e-6)  # float64
    np.testing.assert_allclose(model.encode(x.astype(np.float16)), model.encode(x.astype(np.float16).astype(np.float32)))
    ints = (x * 10).astype(np.int64)
    np.testing.assert_array_equal(model.encode(ints), model.encode(ints.astype(np.float32)))
    np.testing.assert_allclose(model.encode(torch.from_numpy(x)).detach().numpy(), expected, rtol=1e-6)
    np.testing.assert_array_equal(model.encode(x.T.copy().T.astype(np.float32)), expected)  # non-contiguous


def test_numpy_inputs_are_processed_in_chunks(rng, monkeypatch):
    from latentspace.models import base

    model = VAE(12, 3, hidden=(8,))
    x = rng.random((50, 12)).astype(np.float32)
    whole, whole_recon = model.encode(x), model(x)
    monkeypatch.setattr(base, "_NUMPY_CHUNK_ROWS", 7)
    # equal up to float32 rounding (matmul blocking depends on the batch size)
    np.testing.assert_allclose(model.encode(x), whole, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model(x), whole_recon, rtol=1e-5, atol=1e-6)
    mu, logvar = model.posterior(x)
    np.testing.assert_allclose(mu, whole, rtol=1e-5, atol=1e-6)
    assert logvar.shape == (50, 3)


def test_conv_accepts_flat_rows_and_answers_in_their_shape(rng):
    model = ConvAutoencoder((1, 8, 8), 4, channels=(4, 8))
    images = rng.random((6, 1, 8, 8)).astype(np.float32)
    flat = images.reshape(6, 64)
    np.testing.assert_array_equal(model.encode(flat), model.encode(images))
    assert model(flat).shape == (6, 64)
    assert model(images).shape == (6, 1, 8, 8)
    np.testing.assert_array_equal(model(flat), model(images).reshape(6, 64))
    assert model.decode(model.encode(flat)).shape == (6, 1, 8, 8)


@pytest.mark.parametrize("shape,channels", [((1, 28, 28), (8, 16)), ((1, 8, 8), (4, 8, 8)),
                                            ((3, 9, 6), (4, 4)), ((1, 1, 1), (2,))])
def test_conv_reconstructs_exact_image_shapes(rng, shape, channels):
    model = ConvAutoencoder(shape, 5, channels=channels)
    x = torch.rand(2, *shape)
    assert model(x).shape == x.shape
    assert model.decode(torch.zeros(3, 5)).shape == (3, *shape)


def test_outputs_follow_the_output_function(rng):
    x = rng.random((20, 12)).astype(np.float32) * 10 - 5
    sigmoid = Autoencoder(12, 3, output="sigmoid")
    out = sigmoid(x)
    assert out.min() >= 0 and out.max() <= 1
    vae = VAE(12, 3)
    assert vae.output == "sigmoid" and vae.default_loss == "bce"
    linear = Autoencoder(12, 3)
    assert linear.output == "linear" and linear.default_loss == "mse"


def test_vae_encode_returns_mean_unless_sampling(rng):
    torch.manual_seed(0)
    model = VAE(12, 3, hidden=(16,))
    x = rng.random((5, 12)).astype(np.float32)
    mu, logvar = model.posterior(x)
    np.testing.assert_array_equal(model.encode(x), mu)
    np.testing.assert_array_equal(model.encode(x), model.encode(x))
    a = model.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    b = model.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    c = model.encode(x, sample=True, generator=torch.Generator().manual_seed(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, mu)
    # the draw is mu + sigma * eps with the generator's standard normals
    eps = torch.randn((5, 3), generator=torch.Generator().manual_seed(1)).numpy()
    np.testing.assert_allclose(a, mu + np.exp(0.5 * logvar) * eps, rtol=1e-5, atol=1e-6)


def test_vae_samples_have_the_posterior_spread():
    torch.manual_seed(0)
    model = VAE(4, 2, hidden=(8,))
    x = torch.rand(1, 4).expand(20000, 4)
    with torch.no_grad():
        draws = model.encode(x, sample=True, generator=torch.Generator().manual_seed(0))
        mu, logvar = model.posterior(x[:1])
    torch.testing.assert_close(draws.mean(0), mu[0], atol=0.05, rtol=0)
    torch.testing.assert_close(draws.std(0), torch.exp(0.5 * logvar[0]), atol=0, rtol=0.05)


def test_model_moves_with_to_and_checks_tensor_device(rng):
    model, _ = _models()[0]
    model = model.double()
    z = model.encode(rng.random((3, 12)))
    assert z.dtype == np.float64  # numpy callers get the model's dtype
    meta = torch.empty(3, 12, device="meta")
    with pytest.raises(ValueError, match="x: expected a tensor on the model's device 'cpu'"):
        model.encode(meta)


def test_numpy_input_is_never_written_by_an_in_place_encoder(rng):
    """A model that works in place gets a copy of numpy input (torch input: torch's semantics)."""
    torch.manual_seed(0)
    model = Autoencoder(4, 2, hidden=(3,))
    model.encoder.insert(0, torch.nn.ReLU(inplace=True))
    x = rng.standard_normal((6, 4)).astype(np.float32)
    before = x.copy()
    with torch.no_grad():
        expected = model.encode(torch.from_numpy(before.copy())).numpy()
    np.testing.assert_allclose(model.encode(x), expected, rtol=1e-6)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i2"])
def test_big_endian_numpy_input(rng, dtype):
    model, _ = _models()[0]
    x = (rng.standard_normal((5, 12)) * 3).astype(dtype)
    np.testing.assert_allclose(model.encode(x), model.encode(x.astype(np.float32)), rtol=1e-6)


def test_bfloat16_model_gives_numpy_callers_float32(rng):
    model = Autoencoder(16, 3, hidden=(8,)).bfloat16()
    x = rng.standard_normal((5, 16)).astype(np.float32)
    z = model.encode(x)  # numpy has no bfloat16
    assert isinstance(z, np.ndarray) and z.dtype == np.float32 and z.shape == (5, 3)
    with torch.no_grad():
        expected = model.encode(torch.from_numpy(x).bfloat16())
    assert expected.dtype == torch.bfloat16  # torch callers keep the model's dtype
    np.testing.assert_array_equal(z, expected.float().numpy())
    assert model.decode(z).dtype == np.float32


# ---------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize("index", [0, 2, 3])
def test_bad_inputs(index):
    model, shape = _models()[index]
    good = np.zeros((2, *shape), dtype=np.float32)
    with pytest.raises(ValueError, match=r"x: expected shape \(n, "):
        model.encode(good[0])  # one sample without its batch axis
    with pytest.raises(ValueError, match=r"x: expected shape"):
        model.encode(np.zeros((2, 5), dtype=np.float32))
    with pytest.raises(TypeError, match="x: expected a real numeric dtype"):
        model.encode(good.astype(bool))
    with pytest.raises(TypeError, match="x: expected a real numeric dtype"):
        model.encode(good.astype(np.complex64))
    with pytest.raises(TypeError, match="x: expected a real numeric dtype"):
        model.encode(torch.zeros(2, *shape, dtype=torch.bool))
    with pytest.raises(TypeError, match="x: expected a numpy array or torch tensor"):
        model.encode("pixels")
    with pytest.raises(ValueError, match=rf"z: expected shape \(n, {model.latent_dim}\)"):
        model.decode(np.zeros((2, model.latent_dim + 1), dtype=np.float32))
    with pytest.raises(ValueError, match=r"x: expected shape"):
        model(good.reshape(-1))


def test_one_sample_hint():
    model, _ = _models()[0]
    with pytest.raises(ValueError, match=r"reshape\(1, -1\)"):
        model.encode(np.zeros(12, dtype=np.float32))


@pytest.mark.parametrize("make,message", [
    (lambda: Autoencoder(0, 3), "input_dim: expected an integer >= 1, got 0"),
    (lambda: Autoencoder(12, 0), "latent_dim: expected an integer >= 1, got 0"),
    (lambda: Autoencoder(12, 3.5), "latent_dim: expected an integer >= 1"),
    (lambda: Autoencoder(12, 3, hidden=(16, 0)), r"hidden\[1\]: expected an integer >= 1, got 0"),
    (lambda: Autoencoder(12, 3, hidden="16"), "hidden: expected a tuple of integers"),
    (lambda: Autoencoder(12, 3, activation="sigmoidal"), "activation: expected one of"),
    (lambda: Autoencoder(12, 3, output="softmax"), "output: expected one of"),
    (lambda: VAE(12, 3, beta=-1), r"beta: expected a finite number in \[0, inf\]"),
    (lambda: VAE(12, 3, beta=float("nan")), "beta: expected a finite number"),
    (lambda: VAE(12, 3, kl_warmup=-2), "kl_warmup: expected a finite number"),
    (lambda: ConvAutoencoder((8, 8), 3), r"input_shape: expected \(C, H, W\)"),
    (lambda: ConvAutoencoder((1, 0, 8), 3), r"input_shape\[1\]: expected an integer >= 1"),
    (lambda: ConvAutoencoder((1, 8, 8), 3, channels=()), "channels: expected at least one layer"),
    (lambda: PCA(0), "latent_dim: expected an integer >= 1"),
    (lambda: PCA(10**23), r"latent_dim: a code of 100000000000000000000000 numbers needs at least as many parameters, more than 2\*\*40"),
    (lambda: PCA(2, whiten="yes"), "whiten: expected True or False"),
])
def test_bad_constructor_arguments(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_objective_rejects_bce_on_a_linear_output():
    model = Autoencoder(12, 3)
    with pytest.raises(ValueError, match="loss: 'bce' needs a model whose output is a probability"):
        model.objective(torch.rand(4, 12), loss="bce")
    with pytest.raises(ValueError, match="loss: expected one of"):
        model.objective(torch.rand(4, 12), loss="l1")



@pytest.mark.parametrize("index", [0, 2, 3])
def test_objective_refuses_what_torch_would_fail_on(index):
    # objective is the training loop's API: a tensor of the model's dtype and device, the
    # right per-sample shape, rows; torch's own errors for the rest name no argument
    model, shape = _models()[index]
    good = torch.rand(2, *shape)
    assert torch.isfinite(model.objective(good, progress=0.5, generator=torch.Generator())["loss"])
    with pytest.raises(TypeError, match=r"^x: objective\(\) is a training API and expects a torch tensor"):
        model.objective(good.numpy())
    with pytest.raises(ValueError, match=r"^x: expected shape"):
        model.objective(torch.rand(2, 5))
    for dtype in (torch.float64, torch.int64):
        with pytest.raises(TypeError, match=r"^x: expected a float32 tensor \(the model's dtype\)"):
            model.objective(good.to(dtype))
    with pytest.raises(ValueError, match=r"^x: expected at least one row"):
        model.objective(good[:0])
    with pytest.raises(TypeError, match=r"^x: expected a dense tensor"):
        model.objective(good.reshape(2, -1).to_sparse() if index == 3 else good.to_sparse())
    for bad in (3, "seed"):
        with pytest.raises(TypeError, match=r"^generator: expected None or a torch.Generator"):
            model.objective(good, generator=bad)
    for bad in ("1", True, [1.0]):
        with pytest.raises(TypeError, match=r"^progress: expected a number"):
            model.objective(good, progress=bad)
    for bad in (float("nan"), -1.0):
        with pytest.raises(ValueError, match=r"^progress: expected a finite number"):
            model.objective(good, progress=bad)


def test_objective_takes_a_double_model_with_double_batches():
    model = Autoencoder(6, 2, hidden=(4,)).double()
    assert model.objective(torch.rand(3, 6, dtype=torch.float64))["loss"].dtype == torch.float64
    with pytest.raises(TypeError, match=r"^x: expected a float64 tensor"):
        model.objective(torch.rand(3, 6))


def test_vae_sampling_refuses_a_bad_generator():
    model = VAE(6, 2, hidden=(4,))
    x = np.zeros((2, 6), dtype=np.float32)
    with pytest.raises(TypeError, match=r"^generator: expected None or a torch.Generator, got int 5"):
        model.encode(x, sample=True, generator=5)
    assert model.encode(x, sample=True, generator=torch.Generator().manual_seed(0)).shape == (2, 2)
    with pytest.raises(TypeError, match=r"^progress: expected a number"):
        model.kl_weight("1")


@pytest.mark.parametrize("make,name", [
    (lambda: Autoencoder(10, 2**63), "latent_dim"),
    (lambda: Autoencoder(10, 10**12), "latent_dim"),
    (lambda: Autoencoder(10**12, 2), "input_dim"),
    (lambda: Autoencoder(10, 2, hidden=(16, 10**400)), "hidden"),
    (lambda: VAE(10**12, 3), "input_dim"),
    (lambda: VAE(10, 2**63), "latent_dim"),
    (lambda: ConvAutoencoder((1, 10**6, 10**6), 2), "input_shape"),
    (lambda: ConvAutoencoder((1, 8, 8), 2**62), "latent_dim"),
])
def test_sizes_beyond_any_machine_are_refused_by_name(make, name):
    # torch would fail with an int64 overflow or "can't allocate memory", naming nothing
    with pytest.raises(ValueError, match=rf"^{name}: .* more than 2\*\*40 \(MAX_PARAMETERS"):
        make()


@pytest.mark.parametrize("hidden", [np.array([16, 8]), range(16, 7, -8), [16, 8], (np.int64(16), 8)])
def test_hidden_sizes_take_sequences_of_integers(hidden):
    """A numpy array or range of widths is the widths (an array was read as one width and
    refused with a misleading message)."""
    assert Autoencoder(12, 3, hidden=hidden).hidden == (16, 8)
    assert VAE(12, 3, hidden=hidden).hidden == (16, 8)


def test_the_parameter_bound_counts_the_real_parameters(monkeypatch):
    import latentspace.models.autoencoder as ae_module
    import latentspace.models.conv as conv_module
    import latentspace.models.vae as vae_module

    counted = []
    for module in (ae_module, vae_module, conv_module):
        monkeypatch.setattr(module, "check_parameter_count", lambda count, sizes: counted.append(count))
    models = [Autoencoder(12, 3, hidden=(16, 5)), Autoencoder(12, 3, hidden=()), VAE(12, 3, hidden=(7,)),
              ConvAutoencoder((3, 7, 5), 2, channels=(4, 6)), ConvAutoencoder((1, 8, 8), 4, channels=(4,))]
    assert counted == [sum(p.numel() for p in model.parameters()) for model in models]


# ---------------------------------------------------------------------------------------
# PCA


def test_pca_matches_scikit_learn(rng):
    from sklearn.decomposition import PCA as SkPCA

    x = rng.normal(size=(200, 10)) @ rng.normal(size=(10, 10)) + rng.normal(size=10)
    ours = PCA(4).fit(x)
    theirs = SkPCA(4, svd_solver="full").fit(x)
    np.testing.assert_allclose(ours.explained_variance.numpy(), theirs.explained_variance_, rtol=1e-5)
    np.testing.assert_allclose(ours.explained_variance_ratio.numpy(), theirs.explained_variance_ratio_, rtol=1e-5)
    np.testing.assert_allclose(ours.singular_values.numpy(), theirs.singular_values_, rtol=1e-5)
    np.testing.assert_allclose(ours.mean.numpy(), theirs.mean_, rtol=1e-5, atol=1e-6)
    # components agree up to sign; ours has each component's largest entry positive
    components = ours.components.numpy()
    signs = np.sign((components * theirs.components_).sum(1))
    np.testing.assert_allclose(components, signs[:, None] * theirs.components_, atol=1e-5)
    assert (components[np.arange(4), np.abs(components).argmax(1)] > 0).all()
    z = ours.encode(x)
    np.testing.assert_allclose(z, theirs.transform(x) * signs, atol=1e-4)
    np.testing.assert_allclose(ours.decode(z), theirs.inverse_transform(theirs.transform(x)), atol=1e-4)


def test_pca_whitening(rng):
    from sklearn.decomposition import PCA as SkPCA

    x = rng.normal(size=(300, 6)) * np.array([5, 3, 2, 1, 0.5, 0.1])
    model = PCA(3, whiten=True).fit(x)
    z = model.encode(x)
    np.testing.assert_allclose(z.std(0, ddof=1), 1.0, rtol=1e-4)
    theirs = SkPCA(3, whiten=True, svd_solver="full").fit(x)
    np.testing.assert_allclose(np.abs(z), np.abs(theirs.transform(x)), atol=1e-4)
    # decode undoes the whitening: the same reconstruction as without it
    plain = PCA(3).fit(x)
    np.testing.assert_allclose(model(x), plain(x), atol=1e-4)


def test_pca_whitening_of_a_constant_direction_maps_it_to_zero(rng):
    x = np.zeros((10, 3))
    x[:, 0] = np.arange(10)
    model = PCA(2, whiten=True).fit(x)
    fresh = rng.normal(size=(5, 3)) * 100  # off the fitted line too
    for data in (x, fresh):
        z = model.encode(data)
        assert np.isfinite(z).all() and (z[:, 1] == 0).all()
        # the spread component is whitened as usual
        np.testing.assert_allclose(z[:, 0], (data[:, 0] - 4.5) / np.std(np.arange(10), ddof=1), rtol=1e-5)
    assert np.isfinite(model.decode(model.encode(fresh))).all()


def test_pca_whitening_of_constant_data_gives_zeros(rng):
    model = PCA(3, whiten=True).fit(np.full((50, 8), 3.0))
    fresh = rng.normal(size=(4, 8)) * 1e3
    assert (model.encode(fresh) == 0).all()
    np.testing.assert_array_equal(model.decode(model.encode(fresh)), np.full((4, 8), 3.0, np.float32))
    encoder = ls.Encoder(model)  # the native export: the same zeros
    assert (encoder.encode(fresh.astype(np.float32)) == 0).all()


def test_pca_full_rank_reconstructs_exactly(rng):
    x = rng.normal(size=(30, 5))
    np.testing.assert_allclose(PCA(5).fit(x)(x), x, atol=1e-5)


def test_pca_chunked_covariance_path_matches_svd(rng, monkeypatch):
    x = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
    exact = PCA(3).fit(x)
    monkeypatch.setattr(pca_module, "_SVD_MAX_ELEMENTS", 10)
    monkeypatch.setattr(pca_module, "_CHUNK_ROWS", 64)
    chunked = PCA(3).fit(x)
    for name in ("mean", "components", "explained_variance", "explained_variance_ratio", "singular_values"):
        torch.testing.assert_close(getattr(chunked, name), getattr(exact, name), rtol=1e-4, atol=1e-5)


def test_pca_fits_a_memory_map(tmp_path, rng):
    x = rng.random((50, 6)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    torch.testing.assert_close(PCA(2).fit(mapped).components, PCA(2).fit(x).components)


def test_pca_explains_the_digits_like_known_figures():
    x, _ = ls.datasets.load_digits()
    ratio = PCA(8).fit(x).explained_variance_ratio.numpy()
    assert np.all(np.diff(ratio) <= 0)
    assert 0.6 < ratio.sum() < 0.75  # 8 of 64 components hold about two thirds of the variance


def test_pca_errors(rng):
    with pytest.raises(ValueError, match=r"latent_dim: PCA\(latent_dim=13\) cannot exceed the input dimension; X has 12 columns"):
        PCA(13).fit(rng.random((40, 12)))
    with pytest.raises(ValueError, match=r"X: PCA\(latent_dim=5\) needs at least max\(2, 5\) rows, got 4"):
        PCA(5).fit(rng.random((4, 12)))
    with pytest.raises(ValueError, match="X: expected a 2-d array"):
        PCA(2).fit(rng.random(12))
    bad = rng.random((10, 4))
    bad[7, 2] = np.nan
    with pytest.raises(ValueError, match="X: row 7 contains NaN or Inf"):
        PCA(2).fit(bad)
    with pytest.raises(TypeError, match="X: expected a real numeric dtype"):
        PCA(2).fit(np.zeros((10, 4), dtype=bool))
    with pytest.raises(ValueError, match="X: expected a CPU or CUDA tensor, got one on 'meta'"):
        PCA(2).fit(torch.ones(10, 4, device="meta"))


def test_pca_refuses_data_float32_cannot_hold(rng):
    """The fitted buffers are float32: values beyond its range, variances beyond it, and (when
    whitening divides by them) variances below its normal range are ValueErrors naming X, not
    inf / NaN codes or all-zero whitened codes."""
    x = rng.random((50, 6))
    x[31, 4] = 1e39
    with pytest.raises(ValueError, match=r"X: row 31 has values beyond float32's range"):
        PCA(2).fit(x)
    with pytest.raises(ValueError, match=r"X: the largest component's variance, .* is beyond float32's range"):
        PCA(2).fit(rng.random((50, 6)) * 1e30)
    tiny = rng.random((50, 6)) * 1e-20
    with pytest.raises(ValueError, match=r"X: with whiten=True the components' variances .* below float32's smallest"):
        PCA(2, whiten=True).fit(tiny)
    codes = PCA(2).fit(tiny).encode(tiny)  # without whitening the projections are representable
    assert np.isfinite(codes).all() and np.abs(codes).max() > 0
    scaled = rng.random((50, 6)) * 1e18  # large but within range: fitted as usual
    assert np.isfinite(PCA(2, whiten=True).fit(scaled).encode(scaled)).all()
    with pytest.raises(ValueError, match="PCA is not fitted: call fit"):
        PCA(2).encode(rng.random((3, 4)))
    with pytest.raises(ValueError, match="PCA is not fitted"):
        PCA(2).decode(rng.random((3, 2)))
    with pytest.raises(ValueError, match=r"x: expected shape \(n, 12\)"):
        PCA(2).fit(rng.random((10, 12))).encode(rng.random((3, 11)))


def test_pca_state_dict_loads_into_a_fresh_pca(rng):
    """torch's usual round trip, model.load_state_dict(state), works for the learned models;
    a fresh PCA held empty buffers, so torch refused the fitted ones (size mismatch) and
    there was no way to get a fitted PCA back from its state_dict."""
    x = rng.random((30, 7))
    fitted = PCA(3, whiten=True).fit(x)
    fresh = PCA(3, whiten=True)
    fresh.load_state_dict(fitted.state_dict())
    assert fresh.is_fitted and fresh.input_shape == (7,)
    np.testing.assert_array_equal(fresh.encode(x), fitted.encode(x))
    # a fitted one takes another fit's state, of another input dimension too
    other = PCA(3).fit(rng.random((30, 5)))
    fitted.load_state_dict(other.state_dict())
    assert fitted.input_shape == (5,)
    # a state of another latent_dim, or of shapes no fit gives, is still refused by torch,
    # naming the tensor, and leaves an unfitted PCA unfitted
    unfitted = PCA(2)
    with pytest.raises(RuntimeError, match="components"):
        unfitted.load_state_dict(other.state_dict())
    assert not unfitted.is_fitted and unfitted.mean.shape == (0,)
    with pytest.raises(RuntimeError, match="components"):
        unfitted.load_state_dict({**PCA(2).fit(x).state_dict(), "components": torch.zeros(2, 6)})
    assert not unfitted.is_fitted



def test_pca_state_dict_that_fails_to_load_leaves_the_pca_as_it_was(rng):
    # The buffers are resized before torch copies into them: a copy that fails after that
    # (a numpy array in the state) must not leave a fitted PCA with zeroed buffers.
    x = rng.random((30, 7))
    fitted = PCA(3).fit(x)
    codes = fitted.encode(x)
    state = PCA(3).fit(rng.random((30, 5))).state_dict()
    state["components"] = state["components"].numpy()  # the right shape, not a tensor
    with pytest.raises(RuntimeError, match="components"):
        fitted.load_state_dict(state)
    assert fitted.is_fitted and fitted.input_shape == (7,)
    np.testing.assert_array_equal(fitted.encode(x), codes)

def test_pca_fit_keeps_a_float64_model_float64(rng):
    """PCA(k).double().fit(X) came back float32: fit stored its buffers as float32 whatever
    the model's dtype, so a float64 model (which load_model and train keep float64) silently
    became a float32 one, and data far from the origin lost its spread to float32 rounding
    (codes 5% off a float64 SVD's for 1e6 + N(0, 1) data). (scikit-learn is no reference
    here: its covariance solver loses 1e-3 of these codes to cancellation.)"""
    x = 1e6 + rng.standard_normal((200, 3)) * np.array([3.0, 1.0, 0.1])
    model = PCA(2).double().fit(x)
    assert all(buffer.dtype == torch.float64 for buffer in model.buffers())
    codes = model.encode(x)
    assert codes.dtype == np.float64
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    signs = np.sign(model.components.numpy()[:, 0] * vt[:2, 0])
    np.testing.assert_allclose(codes, centred @ vt[:2].T * signs, rtol=0, atol=1e-8)
    # the default stays float32, and a float64 model takes data beyond float32's range
    assert PCA(2).fit(x).mean.dtype == torch.float32
    assert np.isfinite(PCA(2).double().fit(x * 1e100).encode(x * 1e100)).all()


def test_pca_from_config_is_an_unfitted_pca_until_its_weights_load(rng, tmp_path):
    """PCA.from_config(pca.config()) came back marked fitted with zeroed buffers: encode gave
    every input the code 0 and decode the point 0, silently. It is a fresh PCA (as
    from_config promises) of that input dimension, fitted once a state loads into it."""
    x = rng.random((30, 7))
    fitted = PCA(3, whiten=True).fit(x)
    fresh = PCA.from_config(fitted.config())
    assert not fresh.is_fitted and fresh.whiten and fresh.mean.shape == (7,)
    with pytest.raises(ValueError, match="PCA is not fitted"):
        fresh.encode(x)
    fresh.load_state_dict(fitted.state_dict())
    assert fresh.is_fitted
    np.testing.assert_array_equal(fresh.encode(x), fitted.encode(x))
    ls.save_model(fitted, tmp_path / "pca.safetensors")  # load_model builds with from_config
    np.testing.assert_array_equal(ls.load_model(tmp_path / "pca.safetensors").encode(x), fitted.encode(x))


@pytest.mark.parametrize("cls, config, message", [
    (VAE, [64, 4], r"config: expected a dict of VAE's constructor arguments \(what config\(\) returns\), got list"),
    (Autoencoder, {"input_dim": 64, "latent_dim": 4, "bogus": 1}, r"config: unknown key 'bogus' for Autoencoder"),
    (PCA, {"latent_dim": 2, "whiten": False}, r"config: missing 'input_dim' for PCA"),
    (PCA, {"latent_dim": 2, "input_dim": 5, "colour": 1}, r"config: unknown key 'colour' for PCA"),
])
def test_from_config_names_what_is_wrong_with_the_config(cls, config, message):
    """Python's own errors ("argument after ** must be a mapping", "got an unexpected keyword
    argument", KeyError('input_dim')) named no argument."""
    with pytest.raises(TypeError, match=message):
        cls.from_config(config)


@pytest.mark.parametrize("make, name", [
    (lambda: Autoencoder(4096, 8, hidden=(1024,)), "input_dim"),
    (lambda: VAE(64, 8, hidden=(512, 4096)), "hidden"),
    (lambda: ConvAutoencoder((1, 256, 256), 8, channels=(32,)), "input_shape"),
])
def test_weights_larger_than_the_machines_memory_are_refused_by_name(monkeypatch, make, name):
    """Autoencoder(10**7, 10**7) (7.7e9 parameters, 31 GB: under 2**40) was built, and the
    kernel killed Python while its weights were initialised, on a 24 GB machine: no
    exception at all. Weights beyond the machine's memory are refused, naming the largest
    size; under a meta device (as load_model builds) nothing is allocated, so nothing is."""
    from latentspace.models import _checks

    monkeypatch.setattr(_checks, "memory_limit", lambda: MemoryLimit(16 << 20))  # a 16 MiB machine
    with pytest.raises(MemoryError, match=rf"^{name}: .* GiB of float32 weights, more than this machine's 16.0 MiB of memory; use smaller sizes$"):
        make()
    with torch.device("meta"):
        make()
    monkeypatch.setattr(_checks, "memory_limit", lambda: MemoryLimit(16 << 20, cgroup=True))  # a 16 MiB container
    with pytest.raises(MemoryError, match=rf"^{name}: .* weights, more than the 16.0 MiB memory limit of this process's cgroup"):
        make()
    monkeypatch.setattr(_checks, "memory_limit", lambda: None)  # where it cannot be told
    Autoencoder(4096, 8, hidden=(1024,))


def test_pca_of_wide_data_never_builds_a_features_by_features_matrix(rng, monkeypatch):
    """Past _SVD_MAX_ELEMENTS, fit accumulated X^T X, d x d in float64, whatever n: 300 rows
    of 60,000 features (144 MB of data) asked for 29 GB, and the kernel killed Python. Data
    wider than it is long is decomposed by SVD (the data's own size) instead."""
    x = rng.normal(size=(20, 300))
    exact = PCA(3).fit(x)
    monkeypatch.setattr(pca_module, "_SVD_MAX_ELEMENTS", 100)
    shapes = []
    real = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh",
                        lambda a, *args, **kw: shapes.append(tuple(a.shape)) or real(a, *args, **kw))
    wide = PCA(3).fit(x)
    assert shapes == []
    for name in ("mean", "components", "explained_variance", "singular_values"):
        torch.testing.assert_close(getattr(wide, name), getattr(exact, name))
    PCA(3).fit(x[:, :15])  # long data (n >= d) still takes the chunked path
    assert shapes == [(15, 15)]


def test_pca_refuses_wide_data_whose_decomposition_exceeds_memory(rng, monkeypatch):
    """Wide data is decomposed whole, in float64 (a copy, the centred copy, the SVD's): past
    the machine's memory that was the kernel's kill; a MemoryError naming X now."""
    monkeypatch.setattr(pca_module, "memory_limit", lambda: MemoryLimit(100_000))
    with pytest.raises(MemoryError, match=r"X: 20 rows of 300 features .* more than this machine's 0.1 MiB of memory; use fewer"):
        PCA(3).fit(rng.normal(size=(20, 300)))
    PCA(3).fit(rng.normal(size=(20, 30)))  # 14 KiB of work fits


def test_pca_fit_names_data_that_is_no_array(rng):
    """PCA.fit of a generator of rows said "expected a 2-d array ..., got shape ()" (np.asarray
    wraps the generator in a 0-d object array): what X must be is said instead."""
    x = rng.random((20, 4))
    with pytest.raises(TypeError, match=r"X: expected a numpy array, memory map or torch tensor of shape \(n, d\), "
                                        r"got generator"):
        PCA(2).fit(row for row in x)
    assert PCA(2).fit(x.tolist()).is_fitted  # nested lists of rows are arrays
