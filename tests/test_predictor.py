"""Accuracy predictor: encoding, fit on a known synthetic function, files, and space mismatch."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from onceforall.errors import UserError
from onceforall.specialization.predictor import AccuracyPredictor, encode, encoding_size, fit_predictor
from onceforall.supernet.space import SubnetConfig, fashion_mnist_space, imagenet_mbv3_space
from onceforall.supernet.subnet_batch import SubnetBatch


def synthetic_accuracy(space, batch: SubnetBatch, rng: np.random.Generator,
                       noise: float = 0.1) -> np.ndarray:
    """A smooth known function: bigger kernels, wider and deeper blocks and higher resolution help,
    later slots count more; plus Gaussian noise of ``noise`` points."""
    r_idx, k_idx, e_idx, act = batch.indices(space)
    weight = np.linspace(0.5, 1.5, space.num_slots)  # (S,)
    per_slot = act * (0.4 * k_idx + 0.6 * e_idx + 0.3) * weight  # (N, S)
    return 75 + 0.5 * per_slot.sum(1) + r_idx + rng.normal(0, noise, len(batch))


@pytest.fixture(scope="module")
def fitted():
    space = fashion_mnist_space()
    rng = np.random.default_rng(0)
    batch = SubnetBatch.sample(space, rng, 400)
    acc = synthetic_accuracy(space, batch, rng)
    predictor, metrics = fit_predictor(space, batch, acc, seed=0, epochs=80, patience=20)
    return space, predictor, metrics


def test_encoding_layout():
    space = fashion_mnist_space()
    cfg = SubnetConfig(24, (2, 3, 4, 2), (7,) * 16, (4,) * 16)
    x = encode(space, [cfg])
    assert x.shape == (1, encoding_size(space)) == (1, 16 * 6 + 3) and x.dtype == np.float32
    slots = x[0, :96].reshape(16, 6)  # per slot: k one-hot (3,7) | e one-hot (3,4,6)
    active = [cfg.is_active(s, 4) for s in range(16)]
    assert (slots[active] == [0, 0, 1, 0, 1, 0]).all()
    assert (slots[np.logical_not(active)] == 0).all()
    assert x[0, 96:].tolist() == [0, 1, 0]
    # Latent values in skipped slots never leak into the encoding.
    batch = SubnetBatch.sample(space, np.random.default_rng(1), 50)
    assert np.array_equal(encode(space, batch), encode(space, batch.canonical(space)))
    assert np.array_equal(encode(space, batch), encode(space, batch.to_configs(space)))


def test_encoding_imagenet_size():
    space = imagenet_mbv3_space()
    assert encoding_size(space) == 20 * 6 + 25
    x = encode(space, SubnetBatch.sample(space, np.random.default_rng(2), 10))
    assert (x[:, -25:].sum(1) == 1).all()


def test_fit_reaches_rank_correlation(fitted):
    _, _, metrics = fitted
    assert metrics["kendall_tau"] > 0.8
    assert metrics["spearman_rho"] > 0.9
    assert metrics["rmse"] < 1.0 and metrics["mae"] <= metrics["rmse"]
    assert metrics["n_fit"] + metrics["n_test"] == 400 and metrics["n_test"] == 40
    assert len(metrics["best_epochs"]) == metrics["members"] == 5
    assert all(1 <= e <= metrics["epochs_run"] for e in metrics["best_epochs"])
    assert metrics["val_rmse"] < 1.0


def test_ensemble_is_the_mean_of_members(fitted):
    space, predictor, _ = fitted
    x = encode(space, SubnetBatch.sample(space, np.random.default_rng(8), 50))
    import torch

    with torch.inference_mode():
        each = predictor.model.member_outputs(torch.from_numpy(x)).numpy()  # (M, N)
    assert each.shape == (5, 50)
    assert np.allclose(predictor.predict(x), each.mean(0), atol=1e-4)  # numpy inference == torch
    assert each.std(0).mean() > 0  # the members differ: different folds and inits


def test_numpy_inference_follows_the_weights(fitted):
    """predict_numpy keeps numpy views of the weights: in-place updates (training, load_state_dict)
    show at once, and a module with new tensors gets new views."""
    import copy

    import torch

    space, predictor, _ = fitted
    x = encode(space, SubnetBatch.sample(space, np.random.default_rng(9), 20))
    model = copy.deepcopy(predictor.model)  # new tensors: its own views, not the original's
    before = model.predict_numpy(x)
    assert np.allclose(before, predictor.predict(x), atol=1e-5)
    with torch.no_grad():
        model.base_acc.add_(1.0)
        model.weights[1].mul_(0.5)
        after = model.predict_numpy(x)
        assert np.allclose(after, model(torch.from_numpy(x)).numpy(), atol=1e-4)
    assert not np.allclose(after, before, atol=0.5)
    assert np.allclose(predictor.predict(x), before, atol=1e-5)  # the original is untouched


def test_predict_accepts_configs_batches_and_encodings(fitted):
    space, predictor, _ = fitted
    batch = SubnetBatch.sample(space, np.random.default_rng(3), 2000)
    by_batch = predictor.predict(batch)
    assert by_batch.shape == (2000,)
    assert np.allclose(predictor.predict(encode(space, batch)), by_batch)
    assert np.allclose(predictor.predict(batch.to_configs(space)[:7]), by_batch[:7])
    with pytest.raises(ValueError):
        predictor.predict(np.zeros((3, 5), np.float32))


def test_fit_is_seeded():
    space = fashion_mnist_space()
    rng = np.random.default_rng(4)
    batch = SubnetBatch.sample(space, rng, 60)
    acc = synthetic_accuracy(space, batch, rng)
    _, a = fit_predictor(space, batch, acc, seed=7, epochs=3, hidden=(32, 32, 32))
    _, b = fit_predictor(space, batch, acc, seed=7, epochs=3, hidden=(32, 32, 32))
    assert a == b


def test_save_load_roundtrip(fitted, tmp_path):
    space, predictor, metrics = fitted
    weights, sidecar = predictor.save(tmp_path / "predictor")
    assert weights.suffix == ".safetensors" and sidecar.suffix == ".json"
    meta = json.loads(sidecar.read_text())
    assert meta["space"] == space.to_dict() and meta["encoding_size"] == encoding_size(space)
    assert meta["hidden"] == [128, 128] and meta["members"] == 5 and meta["metrics"] == metrics
    batch = SubnetBatch.sample(space, np.random.default_rng(5), 100)
    for path in (weights, sidecar):
        loaded = AccuracyPredictor.load(path, space)
        assert np.array_equal(loaded.predict(batch), predictor.predict(batch))
        assert loaded.metrics == metrics


def test_load_rejects_other_space(fitted, tmp_path):
    space, predictor, _ = fitted
    weights, sidecar = predictor.save(tmp_path / "p.safetensors")
    with pytest.raises(UserError) as err:
        AccuracyPredictor.load(weights, imagenet_mbv3_space())
    assert str(sidecar) in str(err.value) and "space." in str(err.value) and "fix" in str(err.value)
    narrower = dataclasses.replace(space, resolutions=(24, 28))
    with pytest.raises(UserError, match=r"space\.resolutions.*\[20, 24, 28\]"):
        AccuracyPredictor.load(weights, narrower)


def test_load_rejects_tampered_weights(fitted, tmp_path):
    space, predictor, _ = fitted
    weights, _ = predictor.save(tmp_path / "p")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        AccuracyPredictor.load(weights, space)
    with pytest.raises(UserError, match="not found"):
        AccuracyPredictor.load(tmp_path / "missing.safetensors", space)


@pytest.mark.parametrize("acc, match", [
    (np.full(30, 0.9), "fractions"),
    (np.full(30, 120.0), r"\[0, 100\]"),
    (np.full(10, 90.0), "too few"),
])
def test_fit_rejects_bad_accuracies(acc, match):
    space = fashion_mnist_space()
    batch = SubnetBatch.sample(space, np.random.default_rng(6), len(acc))
    with pytest.raises(UserError, match=match):
        fit_predictor(space, batch, acc, seed=0, epochs=1)


@pytest.mark.parametrize("kwargs, field", [
    ({"members": 1}, "members"),
    ({"members": 40}, "members"),
    ({"test_fraction": 0.0}, "test_fraction"),
])
def test_fit_rejects_bad_settings(kwargs, field):
    space = fashion_mnist_space()
    batch = SubnetBatch.sample(space, np.random.default_rng(6), 60)
    with pytest.raises(UserError, match=field):
        fit_predictor(space, batch, np.full(60, 90.0), seed=0, epochs=1, **kwargs)
