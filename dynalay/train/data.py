"""Data sets, generated or read locally (nothing is downloaded).

* ``mnist1d``: ``mnist1d.data.make_dataset(get_dataset_args())`` (the default split: 4000 train /
  1000 test, 40 features, 10 classes).  ``mnist1d.get_dataset`` is never called (it downloads).
  ``make_dataset`` reseeds the global ``random`` / ``np.random`` (``set_seed(42)``), so our own
  generators are seeded after it.  The arrays are cached (``$DYNALAY_CACHE`` or
  ``~/.cache/dynalay``, written atomically) to save the ~4 s of generation.
* ``digits``: scikit-learn's bundled ``load_digits`` (1797 x 64), stratified 75/25 split with
  ``random_state=0``.

Both are standardised with the training split's per-feature mean and std.  The training split is
further cut (stratified, seeded) into ``fit`` (backbone and baselines) and ``val`` (the agent's
policy gradient and calibration: the backbone never trains on it, so the confidence the agent
sees on it behaves like the test set's).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import Tensor

DATASETS = ("mnist1d", "digits")


@dataclass
class Split:
    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class DataBundle:
    name: str
    fit: Split
    val: Split
    test: Split
    num_classes: int
    mean: Tensor
    std: Tensor

    @property
    def in_features(self) -> int:
        return int(self.fit.x.shape[1])

    def describe(self) -> str:
        return (f"{self.name}: fit {len(self.fit)} / val {len(self.val)} / test {len(self.test)}, "
                f"{self.in_features} features, {self.num_classes} classes")


def cache_dir() -> str:
    d = os.environ.get("DYNALAY_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "dynalay")
    return d


def _atomic_savez(path: str, **arrays) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_mnist1d_arrays(use_cache: bool = True):
    """(x_train, y_train, x_test, y_test) of the default MNIST-1D split, as numpy arrays."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    key = hashlib.sha256(repr(sorted(vars(args).items())).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir(), f"mnist1d-{key}.npz")
    if use_cache and os.path.exists(path):
        try:
            with np.load(path) as z:
                return z["x"], z["y"], z["x_test"], z["y_test"]
        except Exception:  # noqa: BLE001  a broken cache file: regenerate
            pass
    d = make_dataset(args)  # NB: calls set_seed(42) (global RNGs)
    arrays = dict(x=np.asarray(d["x"], np.float32), y=np.asarray(d["y"], np.int64),
                  x_test=np.asarray(d["x_test"], np.float32), y_test=np.asarray(d["y_test"], np.int64))
    if use_cache:
        try:
            _atomic_savez(path, **arrays)
        except OSError:
            pass
    return arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"]


def load_digits_arrays():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x, y = d.data.astype(np.float32), d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    return xtr, ytr, xte, yte


def _stratified_holdout(y: np.ndarray, fraction: float, seed: int):
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        val.append(idx[: int(round(fraction * len(idx)))])
    val = np.sort(np.concatenate(val))
    fit = np.setdiff1d(np.arange(len(y)), val)
    return fit, val


def load_data(name: str = "mnist1d", val_fraction: float = 0.15, split_seed: int = 0,
              arrays: Optional[tuple] = None) -> DataBundle:
    """Load ``name`` (``mnist1d`` or ``digits``), standardise, and hold out ``val_fraction`` of the
    training split (stratified, ``split_seed``).  ``arrays`` overrides the raw
    ``(x_train, y_train, x_test, y_test)`` (tests)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5) (got {val_fraction})")
    if arrays is None:
        arrays = load_mnist1d_arrays() if name == "mnist1d" else load_digits_arrays()
    xtr, ytr, xte, yte = (np.asarray(a) for a in arrays)
    mean = xtr.mean(0)
    std = xtr.std(0)
    std = np.where(std > 1e-6, std, 1.0)
    xtr = (xtr - mean) / std
    xte = (xte - mean) / std
    fit, val = _stratified_holdout(ytr, val_fraction, split_seed)
    t = lambda a, dt: torch.as_tensor(np.ascontiguousarray(a), dtype=dt)  # noqa: E731
    f32, i64 = torch.float32, torch.int64
    return DataBundle(name, Split(t(xtr[fit], f32), t(ytr[fit], i64)), Split(t(xtr[val], f32), t(ytr[val], i64)),
                      Split(t(xte, f32), t(yte, i64)), int(max(ytr.max(), yte.max()) + 1),
                      t(mean, f32), t(std, f32))
