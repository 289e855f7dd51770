"""The OFA accuracy predictor: MLPs from an architecture encoding to predicted top-1 accuracy (%).

Measuring a subnet's accuracy costs a BN recalibration and a pass over the validation set; the search
needs tens of thousands of scores, so it asks this predictor instead. It is fitted once on a few
thousand measured subnets and judged on a held-out test split with the numbers that matter for
search: RMSE/MAE in accuracy points and rank correlation (Kendall tau, Spearman rho), because the
search only ever compares candidates. It is a small cross-fitted ensemble rather than the reference's
single large MLP: a few hundred measured subnets are too few for 3x400 units, and averaging members
that each held out a different fold ranks unseen subnets better (see :func:`fit_predictor`).

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

from ..supernet.checkpoint import sha256
from ..errors import UserError
from ..supernet.space import SearchSpace
from ..supernet.subnet_batch import BatchLike, as_batch

FORMAT = "onceforall.accuracy_predictor"
FORMAT_VERSION = 2
# Measured on the standard supernet's 600 subnets (docs/benchmarks.md): two layers of 128 and a
# 5-member cross-fitted ensemble rank held-out subnets better than the reference's single 3x400 MLP
# (Kendall tau +0.03), which overfits a few hundred rows, with 2.4x fewer multiply-adds per subnet.
HIDDEN = (128, 128)
MEMBERS = 5


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
    """An ensemble of ``members`` ReLU MLPs -> scalar, averaged; each with a learned base accuracy
    (the reference's ``base_acc``).

    Each member predicts the deviation from its ``base_acc`` in units of ``acc_scale`` (the training
    rows' standard deviation, fixed at fit time), so Adam's step size suits any dataset's spread of
    accuracies, whether subnets span 2 points or 20.

    The members' weights are stacked along a leading member axis, so the whole ensemble is one matmul
    for the first layer (its input is shared) and one batched matmul per further layer: scoring a
    population costs a handful of calls however many members there are.
    """

    def __init__(self, in_features: int, hidden: Sequence[int] = HIDDEN, members: int = MEMBERS):
        super().__init__()
        if not hidden:
            raise ValueError("the predictor needs at least one hidden layer")
        widths = [in_features, *hidden, 1]
        self.members = members
        # Layer 0 is stored (F, M, H0) so that it is an (F, M*H0) matrix without a copy; the others
        # (M, H_in, H_out) for batched matmuls. `member_dims` says where each parameter's member axis is.
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(in_features, members, hidden[0]))]
            + [nn.Parameter(torch.empty(members, a, b)) for a, b in zip(widths[1:-1], widths[2:])])
        self.biases = nn.ParameterList([nn.Parameter(torch.zeros(members, b)) for b in hidden])
        self.base_acc = nn.Parameter(torch.zeros(members))
        self.register_buffer("acc_scale", torch.ones(()))
        # Plain lists of the same Parameter objects: indexing a ParameterList costs microseconds per
        # access, a measurable share of a search that scores a population 500 times.
        self._plan = (list(self.weights), list(self.biases))
        self.reset_parameters()

    def member_dims(self) -> list[tuple[nn.Parameter, int]]:
        """Every parameter with the index of its member axis."""
        return [(p, 1 if p is self._plan[0][0] else 0) for p in self.parameters()]

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """nn.Linear's default init for every member, drawn from ``generator`` (default: torch's)."""
        with torch.no_grad():
            for i, w in enumerate(self.weights):
                fan_in = w.shape[0] if i == 0 else w.shape[1]
                bound = 1 / math.sqrt(fan_in)  # kaiming_uniform(a=sqrt(5)) == U(+-1/sqrt(fan_in))
                w.uniform_(-bound, bound, generator=generator)
                if i < len(self.biases):
                    self.biases[i].uniform_(-bound, bound, generator=generator)

    def member_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """(M, N) every member's predicted accuracy for encodings ``x`` (N, F)."""
        weights, biases = self._plan
        w0 = weights[0]  # the shared input makes layer 0 one (N, F) @ (F, M*H0)
        h = torch.addmm(biases[0].reshape(-1), x, w0.reshape(w0.shape[0], -1))  # (N, M*H0)
        h = torch.relu(h.view(x.shape[0], self.members, -1).transpose(0, 1))  # (M, N, H0)
        for w, b in zip(weights[1:-1], biases[1:]):
            h = torch.relu(torch.baddbmm(b[:, None, :], h, w))  # (M, N, Hi)
        out = torch.bmm(h, weights[-1]).squeeze(-1)  # (M, N)
        return self.base_acc[:, None] + self.acc_scale * out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_outputs(x).mean(0)  # (N,)

    def predict_numpy(self, x: np.ndarray) -> np.ndarray:
        """``forward`` for inference, in numpy on views of the same CPU weights.

        The search scores a population 500 times, often only the few children it has not seen:
        torch's per-op dispatch and thread-pool wake-ups cost more than the arithmetic there
        (10 rows on 2 threads: 100 us in torch, 50 us here; a whole search 0.35 -> 0.32 s). The
        views are made once (_numpy_plan): making them every call was 10% of a search.
        Training uses ``forward``; a test checks that both agree.
        """
        if self.weights[0].device.type != "cpu":
            with torch.inference_mode():
                return self(torch.from_numpy(x).to(self.weights[0].device)).cpu().numpy()
        w0, weights, last, biases, base = self._numpy_plan()
        h = x @ w0  # (N, M*H0)
        h += biases[0]
        np.maximum(h, 0, out=h)
        # (M, N, H0), contiguous: the batched matmuls below run 25% faster on it for a search's
        # ~20 new rows a generation
        h = np.ascontiguousarray(h.reshape(x.shape[0], self.members, -1).transpose(1, 0, 2))
        for w, b in zip(weights, biases[1:]):
            h = np.matmul(h, w)  # (M, N, Hi)
            h += b
            np.maximum(h, 0, out=h)
        out = np.matmul(h, last)[..., 0]  # (M, N)
        return out.sum(0) * (float(self.acc_scale) / self.members) + float(base.mean())

    def _numpy_plan(self) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, list[np.ndarray], np.ndarray]:
        """Numpy views of the weights for predict_numpy, made once per set of parameter tensors
        (views share their memory, so in-place updates show; new tensors make new views)."""
        params = [*self._plan[0], *self._plan[1], self.base_acc]
        key = tuple(p.data_ptr() for p in params)
        cached = getattr(self, "_numpy_cache", None)
        if cached is None or cached[0] != key:
            weights, biases = ([_numpy_view(t) for t in part] for part in self._plan)
            w0 = weights[0].reshape(weights[0].shape[0], -1)  # (F, M*H0), a view
            plan = (w0, weights[1:-1], weights[-1],
                    [biases[0].reshape(-1)] + [b[:, None, :] for b in biases[1:]], _numpy_view(self.base_acc))
            cached = (key, plan)
            self._numpy_cache = cached
        return cached[1]


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()  # shares memory with the parameter: never stale


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
        return self.model.predict_numpy(x).astype(np.float64)

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
            "hidden": list(self.hidden), "members": self.model.members, "metrics": self.metrics,
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
        model = PredictorMLP(encoding_size(space), hidden, int(meta.get("members", MEMBERS)))
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


def split_indices(n: int, test_fraction: float, folds: int, rng: np.random.Generator
                  ) -> tuple[list[np.ndarray], np.ndarray]:
    """Random disjoint cross-fitting folds and a test split (at least 2 rows)."""
    order = rng.permutation(n)
    n_test = max(2, int(round(test_fraction * n)))
    return np.array_split(order[n_test:], folds), order[:n_test]


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
                  patience: int = 40, test_fraction: float = 0.1, members: int = MEMBERS,
                  hidden: Sequence[int] = HIDDEN) -> tuple[AccuracyPredictor, dict[str, Any]]:
    """Fit the ensemble on measured (config, accuracy %) pairs; returns the predictor and its metrics.

    Cross-fitting: the rows outside the test split are cut into ``members`` folds; member ``m`` trains
    on every fold but ``m`` and is early-stopped on fold ``m`` (its best epoch by RMSE is kept; it
    stops improving after ``patience`` epochs without progress). So every row trains all members but
    one and validates that one, and no row is spent on validation alone. The members train together
    (one batched forward, Adam on each member's own MSE) and the ensemble predicts their mean.
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
    if not 0 < test_fraction < 0.5:
        raise UserError(f"test_fraction {test_fraction} must be in (0, 0.5)", field="test_fraction",
                        fix="use e.g. 0.1")
    n_fit = len(y) - max(2, int(round(test_fraction * len(y))))
    if not 2 <= members <= n_fit // 2:
        raise UserError(f"members={members} for {n_fit} fitting rows", field="members",
                        fix=f"use 2 to {max(2, n_fit // 2)} members (each needs a validation fold of "
                            f"at least 2 rows)")

    rng = np.random.default_rng(seed)
    x = torch.from_numpy(encode(space, batch))  # (N, F)
    yt = torch.from_numpy(y.astype(np.float32))  # (N,)
    folds, test = split_indices(len(y), test_fraction, members, rng)
    fit = np.concatenate(folds)  # (R,) rows that train and validate
    xf, yf = x[fit], yt[fit]
    fold_of = np.repeat(np.arange(members), [len(f) for f in folds])  # (R,) member validating row
    trains = torch.from_numpy(fold_of[None, :] != np.arange(members)[:, None]).float()  # (M, R)
    validates = 1.0 - trains

    generator = torch.Generator().manual_seed(int(rng.integers(2**63 - 1)))
    model = PredictorMLP(x.shape[1], tuple(hidden), members)
    model.reset_parameters(generator)
    with torch.no_grad():
        model.base_acc.fill_(float(y[fit].mean()))
        model.acc_scale.fill_(float(max(y[fit].std(), 1e-3)))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    params = model.member_dims()

    def val_rmse() -> torch.Tensor:
        """(M,) each member's RMSE on its own fold."""
        with torch.inference_mode():
            sq = (model.eval().member_outputs(xf) - yf) ** 2  # (M, R)
            return torch.sqrt((sq * validates).sum(1) / validates.sum(1))

    best_val = val_rmse()
    best_epoch = np.zeros(members, dtype=np.int64)
    best = [p.detach().clone() for p, _ in params]
    epoch = 0
    for epoch in range(1, epochs + 1):
        model.train()
        order = rng.permutation(len(fit))
        for start in range(0, len(order), batch_size):
            idx = torch.from_numpy(order[start:start + batch_size])
            mask = trains[:, idx]  # (M, B) rows each member trains on
            sq = (model.member_outputs(xf[idx]) - yf[idx]) ** 2
            loss = ((sq * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()  # each member's own MSE
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        current = val_rmse()
        better = current < best_val  # (M,)
        if better.any():
            best_val = torch.where(better, current, best_val)
            best_epoch[better.numpy()] = epoch
            with torch.no_grad():
                for kept, (p, dim) in zip(best, params):
                    sel = better.view([-1 if i == dim else 1 for i in range(p.dim())])
                    kept.copy_(torch.where(sel, p, kept))
        if (epoch - best_epoch >= patience).all():
            break
    with torch.no_grad():
        for kept, (p, _) in zip(best, params):
            p.copy_(kept)
    model.eval()

    with torch.inference_mode():
        pred_test = model(x[test]).double().numpy()
    out_of_fold = float(torch.sqrt((best_val ** 2 * validates.sum(1)).sum() / len(fit)))
    metrics: dict[str, Any] = regression_metrics(pred_test, y[test])
    metrics.update({"val_rmse": out_of_fold, "best_epochs": best_epoch.tolist(), "epochs_run": epoch,
                    "members": members, "n_fit": int(len(fit)), "n_test": int(len(test)),
                    "seed": int(seed)})
    return AccuracyPredictor(space, model, tuple(int(h) for h in hidden), dict(metrics)), metrics
