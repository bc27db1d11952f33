"""The ridge pytrees: streamed statistics, a fitted map, and what a solve reports."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np

from ..jsonio import to_jsonable

Array = jax.Array

ACCUMULATION_PRECISIONS = ("highest", "tf32", "bf16", "default")
NONFINITE_MODES = ("skip", "raise", "ignore")
COMPUTE_DTYPES = ("float64", "float32")  # what `solve` computes in
FORMAT_VERSION = 1



class RidgeStats(NamedTuple):
    """Per-fold streaming sufficient statistics (leading axis K = number of folds).

    count [K]: sum of row weights; mean_x [K, d_in]; mean_y [K, d_out];
    sxx [K, d_in, d_in] = sum w (x - mean_x)(x - mean_x)^T; sxy [K, d_in, d_out]; syy [K, d_out] centred
    sum of squares of each target dimension.  Counters (scalars): skipped_batches / skipped_rows (batches
    with NaN/Inf left out under on_nonfinite="skip", and the weight of their valid rows) and
    unassigned_rows (weight of rows whose fold id was outside [0, K)).
    """

    count: Array
    mean_x: Array
    mean_y: Array
    sxx: Array
    sxy: Array
    syy: Array
    skipped_batches: Array
    skipped_rows: Array
    unassigned_rows: Array

    @property
    def n_folds(self) -> int:
        return self.count.shape[0]

    @property
    def d_in(self) -> int:
        return self.mean_x.shape[-1]

    @property
    def d_out(self) -> int:
        return self.mean_y.shape[-1]


class RidgeMap(NamedTuple):
    """A fitted affine map y ~ x @ W + b.

    W [d_in, d_out] (raw-x units, also when fitted with standardize=True), b [d_out], x_mean [d_in] and
    y_mean [d_out] (means of the training rows), lam [d_out] (the ridge penalty used for each target;
    all equal unless chosen per target).  `fold_maps` returns the same type with a leading fold axis.
    """

    W: Array
    b: Array
    x_mean: Array
    y_mean: Array
    lam: Array


@dataclasses.dataclass
class RidgeFit:
    """What `solve` reports.  Arrays are host numpy (float64 when computed in float64).

    lambdas [L] the grid; cv_sse [L, K] held-out sum of squared errors of fold k (summed over targets)
    under the model trained on the other folds; cv_r2 [L] pooled held-out R^2 per lambda; lam the chosen
    lambda (argmin of the summed CV error, first on ties); lam_per_target [d_out] or None; r2 / r2_mean /
    r2_per_target held-out R^2 at the chosen lambda(s) of the out-of-fold predictions (pooled =
    variance-weighted over targets, mean = plain average over targets with nonzero variance); pooled_cosine
    (see module doc); mean_cosine None until `heldout_cosine` fills it.  For a fit without CV (one fold,
    one lambda) the CV fields are None.
    """

    lambdas: np.ndarray
    lam: float
    count: float
    fold_counts: np.ndarray
    n_folds: int
    standardize: bool
    compute_dtype: str
    cv_sse: np.ndarray | None = None
    cv_sse_per_target: np.ndarray | None = None
    cv_r2: np.ndarray | None = None
    lam_per_target: np.ndarray | None = None
    r2: float | None = None
    r2_mean: float | None = None
    r2_per_target: np.ndarray | None = None
    pooled_cosine: float | None = None
    mean_cosine: float | None = None

    def to_metadata(self, per_target: bool = False) -> dict[str, Any]:
        """JSON-able summary for `save_map` metadata (per-target arrays only if `per_target`)."""
        out: dict[str, Any] = {
            "lambda": self.lam,
            "lambdas": self.lambdas,
            "count": self.count,
            "fold_counts": self.fold_counts,
            "n_folds": self.n_folds,
            "standardize": self.standardize,
            "compute_dtype": self.compute_dtype,
            "cv_sse": self.cv_sse,
            "cv_r2": self.cv_r2,
            "heldout_r2": self.r2,
            "heldout_r2_mean": self.r2_mean,
            "heldout_pooled_cosine": self.pooled_cosine,
            "heldout_mean_cosine": self.mean_cosine,
        }
        if per_target:
            out["lambda_per_target"] = self.lam_per_target
            out["heldout_r2_per_target"] = self.r2_per_target
        return to_jsonable(out)


class MetadataMismatchError(ValueError):
    """A saved map's metadata does not match what the caller expected."""


