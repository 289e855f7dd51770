"""The OFA accuracy predictor: an MLP from an architecture encoding to predicted top-1 accuracy (%).

Measuring a subnet's accuracy costs a BN recalibration and a pass over the validation set; the search
needs tens of thousands of scores, so it asks this predictor instead. It is fitted once on a few
thousand measured subnets and judged on a held-out test split with the numbers that matter for
search: RMSE/MAE in accuracy points and rank correlation (Kendall tau, Spearman rho), because the
search only ever compares candidates.

Encoding (as in the reference ``MobileNetArchEncoder``): per block slot a one-hot of the kernel and a
one-hot of the expand ratio, all zeros for skipped slots, then a one-hot of the resolution.

Files: ``<name>.safetensors`` (weights) and ``<name>.json`` (space, encoding size, layer sizes,
metrics, sha256 of the weights). Nothing is unpickled when loading.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch
from torch import nn

from .checkpoint import sha256
from .errors import UserError
from .space import SearchSpace
from .subnet_batch import BatchLike, as_batch

FORMAT = "onceforall.accuracy_predictor"
FORMAT_VERSION = 1
HIDDEN = (400, 400, 400)


# ---------------------------------------------------------------------------------------------
# Encoding


def encoding_size(space: SearchSpace) -> int:
    return space.num_slots * (len(space.kernels) + len(space.expands)) + len(space.resolutions)


def encode(space: SearchSpace, cfgs: BatchLike) -> np.ndarray:
    """(N, F) float32 encoding of configs; ``F = slots * (|kernels| + |expands|) + |resolutions|``.

    Layout: slot 0 [kernel one-hot | expand one-hot], slot 1 [...], ..., resolution one-hot; choices
    in ascending order. Skipped slots are all zeros, so depth is encoded by which slots are empty.
    """
    batch = as_batch(cfgs)
    r_idx, k_idx, e_idx, act = batch.indices(space)
    n, nk, ne = len(batch), len(space.kernels), len(space.expands)
    per_slot = nk + ne
    out = np.zeros((n, encoding_size(space)), dtype=np.float32)
    rows = np.arange(n)[:, None]  # (N, 1)
    base = (np.arange(space.num_slots) * per_slot)[None, :]  # (1, S)
    # Each slot owns its own columns, so writing `act` (0 for skipped) cannot clobber another slot.
    out[rows, base + k_idx] = act
    out[rows, base + nk + e_idx] = act
    out[np.arange(n), space.num_slots * per_slot + r_idx] = 1.0
    return out


# ---------------------------------------------------------------------------------------------
# Model


class PredictorMLP(nn.Module):
    """ReLU MLP -> scalar, plus a learned base accuracy (the reference's ``base_acc``).

    The MLP predicts the deviation from ``base_acc`` in units of ``acc_scale`` (the train split's
    standard deviation, fixed at fit time), so Adam's step size suits any dataset's spread of
    accuracies, whether subnets span 2 points or 20.
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = HIDDEN):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=True)]
            width = h
        layers.append(nn.Linear(width, 1, bias=False))
        self.layers = nn.Sequential(*layers)
        self.base_acc = nn.Parameter(torch.zeros(()))
        self.register_buffer("acc_scale", torch.ones(()))

    def reset_parameters(self, generator: torch.Generator) -> None:
        """nn.Linear's default init, drawn from ``generator`` instead of torch's global RNG."""
        for m in self.layers:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
                if m.bias is not None:
                    bound = 1 / math.sqrt(m.in_features)
                    nn.init.uniform_(m.bias, -bound, bound, generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_acc + self.acc_scale * self.layers(x).squeeze(-1)  # (N,)


@dataclass(frozen=True, eq=False)
class AccuracyPredictor:
    """A fitted predictor bound to its search space; ``metrics`` are its held-out test scores.

    ``model`` is in eval mode (fit and load leave it so); ``predict`` never toggles it.
    """

    space: SearchSpace
    model: PredictorMLP
    hidden: tuple[int, ...]
    metrics: dict[str, Any]

    def predict(self, cfgs: Union[BatchLike, np.ndarray]) -> np.ndarray:
        """(N,) float64 predicted accuracy (%) of configs, a :class:`SubnetBatch`, or encodings (N, F).

        One batched call; thousands of configs take milliseconds.
        """
        if isinstance(cfgs, np.ndarray):
            x = cfgs.astype(np.float32, copy=False)
            if x.ndim != 2 or x.shape[1] != encoding_size(self.space):
                raise ValueError(f"encodings must be (N, {encoding_size(self.space)}), got {x.shape}")
        else:
            x = encode(self.space, cfgs)
        with torch.inference_mode():
            return self.model(torch.from_numpy(x)).double().numpy()

    # -- files --------------------------------------------------------------------------------
    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``path`` (.safetensors weights) and its ``.json`` sidecar; returns both paths."""
        from safetensors.torch import save_file

        weights = Path(path).with_suffix(".safetensors")
        weights.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().clone() for k, v in self.model.state_dict().items()}
        save_file(tensors, str(weights))
        sidecar = {
            "format": FORMAT, "format_version": FORMAT_VERSION,
            "weights_file": weights.name, "weights_sha256": sha256(weights),
            "space": self.space.to_dict(), "encoding_size": encoding_size(self.space),
            "hidden": list(self.hidden), "metrics": self.metrics,
        }
        meta = weights.with_suffix(".json")
        meta.write_text(json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
        return weights, meta

    @classmethod
    def load(cls, path: str | Path, space: SearchSpace) -> "AccuracyPredictor":
        """Load a predictor saved by :meth:`save` (either file's path) and check it fits ``space``."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        meta_path = path.with_suffix(".json")
        if not meta_path.is_file():
            raise UserError("predictor sidecar not found", source=str(meta_path),
                            fix="give the path of a predictor saved with AccuracyPredictor.save")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"not valid JSON ({exc})", source=str(meta_path),
                            fix="re-save the predictor; the sidecar is corrupt") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError(f"not an accuracy predictor sidecar (format {FORMAT!r} expected)",
                            source=str(meta_path), field="format",
                            fix="give the .json written next to a predictor's .safetensors")
        if meta.get("format_version") != FORMAT_VERSION:
            raise UserError(f"format version {meta.get('format_version')!r} is not supported "
                            f"(this code reads {FORMAT_VERSION})", source=str(meta_path),
                            field="format_version", fix="refit the predictor with this version")
        _check_space(meta.get("space"), space, str(meta_path))
        if meta.get("encoding_size") != encoding_size(space):
            raise UserError(f"encoding size {meta.get('encoding_size')} does not match the space's "
                            f"{encoding_size(space)}", source=str(meta_path), field="encoding_size",
                            fix="refit the predictor for this search space")
        weights = meta_path.with_name(str(meta.get("weights_file", "")))
        if not weights.is_file():
            raise UserError("predictor weights not found", source=str(weights),
                            fix="keep the .safetensors file next to its .json sidecar")
        digest = sha256(weights)
        if digest != meta.get("weights_sha256"):
            raise UserError(f"sha256 {digest[:12]}... does not match the sidecar's "
                            f"{str(meta.get('weights_sha256'))[:12]}...", source=str(weights),
                            field="weights_sha256",
                            fix="the weights changed after saving: re-copy both files or refit")
        hidden = tuple(int(h) for h in meta.get("hidden", HIDDEN))
        model = PredictorMLP(encoding_size(space), hidden)
        try:
            state = load_file(str(weights))
            model.load_state_dict(state, strict=True)
        except (SafetensorError, RuntimeError) as exc:
            raise UserError(f"weights do not fit the predictor ({exc})", source=str(weights),
                            fix="refit the predictor; the file is corrupt or from another version"
                            ) from None
        return cls(space, model.eval(), hidden, dict(meta.get("metrics", {})))


def _check_space(saved: Any, space: SearchSpace, source: str) -> None:
    """Raise naming the first space field that differs: a predictor only scores its own supernet."""
    given = json.loads(json.dumps(space.to_dict()))
    if not isinstance(saved, dict):
        raise UserError("has no search space", source=source, field="space",
                        fix="refit the predictor; the sidecar is incomplete")
    for key in sorted(set(given) | set(saved)):
        if saved.get(key) != given.get(key):
            raise UserError(
                f"the predictor was fitted on space {saved.get('name')!r} with {key}="
                f"{saved.get(key)!r}, the given space {space.name!r} has {given.get(key)!r}",
                source=source, field=f"space.{key}",
                fix=f"use the search space the predictor was fitted on, or refit it for "
                    f"{space.name!r}")


# ---------------------------------------------------------------------------------------------
# Fitting


def split_indices(n: int, fractions: tuple[float, float, float], rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random disjoint train/val/test indices; val and test get at least 2 rows each."""
    order = rng.permutation(n)
    n_val = max(2, int(round(fractions[1] * n)))
    n_test = max(2, int(round(fractions[2] * n)))
    return order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test]


def regression_metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float | None]:
    """RMSE and MAE in accuracy points, Kendall tau and Spearman rho of predicted vs measured."""
    from scipy.stats import kendalltau, spearmanr

    err = pred - true
    tau = float(kendalltau(pred, true).statistic)
    rho = float(spearmanr(pred, true).statistic)
    # Rank correlation is undefined (NaN) when either side is constant; JSON has no NaN: use None.
    return {"rmse": float(np.sqrt(np.mean(err**2))), "mae": float(np.mean(np.abs(err))),
            "kendall_tau": tau if math.isfinite(tau) else None,
            "spearman_rho": rho if math.isfinite(rho) else None}


def fit_predictor(space: SearchSpace, configs: BatchLike, accuracies: Sequence[float] | np.ndarray,
                  *, seed: int, epochs: int = 200, batch_size: int = 256, lr: float = 1e-3,
                  patience: int = 40, split: tuple[float, float, float] = (0.8, 0.1, 0.1),
                  hidden: Sequence[int] = HIDDEN) -> tuple[AccuracyPredictor, dict[str, Any]]:
    """Fit the MLP on measured (config, accuracy %) pairs; returns the predictor and its metrics.

    Adam on MSE over the train split; after every epoch the validation RMSE decides which weights
    are kept (the best epoch wins) and stops the fit after ``patience`` epochs without progress.
    The metrics are measured on the test split, which neither training nor selection saw.
    All randomness (split, init, shuffling) derives from ``seed``.
    """
    batch = as_batch(configs)
    y = np.asarray(accuracies, dtype=np.float64)
    if y.shape != (len(batch),):
        raise UserError(f"{len(batch)} configs but accuracies of shape {y.shape}",
                        field="accuracies", fix="give one accuracy per config")
    if not np.isfinite(y).all() or (y < 0).any() or (y > 100).any():
        raise UserError("accuracies must be finite percentages in [0, 100]", field="accuracies",
                        fix="give top-1 accuracy in percent, e.g. 91.3")
    if y.max() <= 1.0:
        raise UserError(f"accuracies look like fractions (max {y.max():.3g})", field="accuracies",
                        fix="give them in percent: multiply by 100")
    if len(y) < 20:
        raise UserError(f"{len(y)} measured subnets are too few to fit and judge a predictor",
                        field="configs", fix="measure at least 20 subnets (the paper uses 1K-16K)")
    if epochs < 1 or batch_size < 1 or patience < 1 or lr <= 0:
        raise UserError(f"epochs={epochs}, batch_size={batch_size}, patience={patience}, lr={lr}",
                        field="epochs", fix="use positive values")
    if len(split) != 3 or min(split) < 0 or not math.isclose(sum(split), 1.0):
        raise UserError(f"split {split} must be three non-negative fractions summing to 1",
                        field="split", fix="use e.g. (0.8, 0.1, 0.1)")

    rng = np.random.default_rng(seed)
    x = torch.from_numpy(encode(space, batch))  # (N, F)
    yt = torch.from_numpy(y.astype(np.float32))  # (N,)
    train, val, test = split_indices(len(y), split, rng)
    if len(train) < 2:
        raise UserError(f"the split {split} leaves {len(train)} training rows", field="split",
                        fix="give more subnets or a larger train fraction")

    generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
    model = PredictorMLP(x.shape[1], tuple(hidden))
    model.reset_parameters(generator)
    with torch.no_grad():
        model.base_acc.fill_(float(y[train].mean()))
        model.acc_scale.fill_(float(max(y[train].std(), 1e-3)))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def rmse(idx: np.ndarray) -> float:
        with torch.inference_mode():
            return float(torch.sqrt(torch.mean((model.eval()(x[idx]) - yt[idx]) ** 2)))

    best_val, best_epoch = rmse(val), 0
    best_state = {k: v.clone() for k, v in model.state_dict().items()}
    epoch = 0
    for epoch in range(1, epochs + 1):
        model.train()
        order = train[rng.permutation(len(train))]
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss = torch.mean((model(x[idx]) - yt[idx]) ** 2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        val_rmse = rmse(val)
        if val_rmse < best_val:
            best_val, best_epoch = val_rmse, epoch
            best_state = {k: v.clone() for k, v in model.state_dict().items()}
        elif epoch - best_epoch >= patience:
            break
    model.load_state_dict(best_state)
    model.eval()

    with torch.inference_mode():
        pred_test = model(x[test]).double().numpy()
    metrics: dict[str, Any] = regression_metrics(pred_test, y[test])
    metrics.update({"val_rmse": best_val, "best_epoch": best_epoch, "epochs_run": epoch,
                    "n_train": int(len(train)), "n_val": int(len(val)), "n_test": int(len(test)),
                    "seed": int(seed)})
    return AccuracyPredictor(space, model, tuple(int(h) for h in hidden), dict(metrics)), metrics
