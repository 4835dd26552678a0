"""AU metrics computed the way the AU literature computes them (docs/facs.md), so our numbers compare with papers'.

- F1 per AU: occurrence over all samples pooled (not per video), then the unweighted mean over AUs.
- ICC(3,1) per AU: two-way mixed, consistency, single rater (Shrout & Fleiss 1979), the raters being
  the reference and the prediction; the intensity-agreement metric of DISFA / BP4D papers.
- MAE per AU on the 0-5 intensity scale.
- Jaccard of AU sets (per sample), optionally restricted to a subset of AUs.
- Frechet distance between Gaussian fits of two feature sets (the FID formula).
- ROC AUC (realism and identity-verification scores).

numpy + scipy only. Every function checks its inputs and raises ValueError saying what it got and what
it expects: a silently broadcast or NaN-poisoned metric is worse than none.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from core.facs import AUS, NUM_AUS, jaccard

__all__ = [
    "AU_KEYS",
    "PerAU",
    "au_report",
    "f1_per_au",
    "frechet_distance",
    "icc3_1",
    "icc_per_au",
    "jaccard",
    "jaccard_rows",
    "mae_per_au",
    "roc_auc",
]

#: Report keys, in AUS order: "AU1", "AU2", ..., "AU26".
AU_KEYS: tuple[str, ...] = tuple(f"AU{a}" for a in AUS)

#: Prediction threshold on occurrence probabilities (the AU literature's convention).
PROBABILITY_THRESHOLD: float = 0.5

#: Relative size of the imaginary part of sqrtm's diagonal above which the Frechet distance is refused.
_IMAG_TOL: float = 1e-3


class PerAU(NamedTuple):
    """A metric per AU (shape (12,), AUS order) and its mean over AUs."""

    per_au: np.ndarray
    mean: float


# ---------------------------------------------------------------------------------------------
# input checks


def _matrix(name: str, x: npt.ArrayLike, cols: int | None = NUM_AUS, min_rows: int = 1) -> np.ndarray:
    """`x` as a numeric 2-D array with `cols` columns (None: any) and at least `min_rows` rows, NaN-free."""
    try:
        a = np.asarray(x)
    except (TypeError, ValueError) as e:  # ragged nested lists
        raise ValueError(f"{name} must be a 2-D numeric array, could not convert it: {e}") from None
    want = f"(n, {cols})" if cols is not None else "(n, d)"
    if a.ndim != 2 or (cols is not None and a.shape[1] != cols):
        what = f" with the {NUM_AUS} AUs {list(AUS)} as columns" if cols == NUM_AUS else ""
        raise ValueError(f"{name} must have shape {want}{what}, got shape {a.shape}")
    if a.dtype != bool and not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name} must be numeric or boolean, got dtype {a.dtype}")
    if np.iscomplexobj(a):
        raise ValueError(f"{name} must be real, got dtype {a.dtype}")
    if a.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} row(s), got shape {a.shape}")
    if a.dtype != bool and not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0].tolist()
        raise ValueError(f"{name} holds NaN/inf (first at row {bad[0]}, column {bad[1]}); drop or impute it first")
    return a


def _same_shape(a_name: str, a: np.ndarray, b_name: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{a_name} {a.shape} and {b_name} {b.shape} must have the same shape (n samples x AUs)")


def _occurrence(name: str, x: np.ndarray) -> np.ndarray:
    """Booleans as they are; probabilities in [0, 1] thresholded at 0.5. Intensities are refused, not guessed."""
    if x.dtype == bool:
        return x
    if x.size and (x.min() < 0.0 or x.max() > 1.0):
        raise ValueError(
            f"{name} must be booleans or probabilities in [0, 1], got values in [{x.min()}, {x.max()}]; "
            "threshold intensities first (e.g. core.facs.occurrence)"
        )
    return x >= PROBABILITY_THRESHOLD


def _binary(name: str, x: np.ndarray) -> np.ndarray:
    """Booleans, or numbers that are all 0/1; anything else (intensities, probabilities) is a caller bug."""
    if x.dtype == bool:
        return x
    if not np.isin(x, (0, 1)).all():
        raise ValueError(f"{name} must be boolean (or 0/1), got values {np.unique(x)[:8].tolist()}...")
    return x.astype(bool)


# ---------------------------------------------------------------------------------------------
# F1


def f1_per_au(reference: npt.ArrayLike, prediction: npt.ArrayLike, zero_division: float = 0.0) -> PerAU:
    """F1 of each AU over all samples pooled, and the unweighted mean over the 12 AUs.

    Inputs are (n, 12) booleans or probabilities (positive = probability >= 0.5). F1 = 2TP / (2TP + FP + FN),
    as scikit-learn computes it. When an AU has no positives in either the reference or the prediction
    (TP + FP + FN = 0) F1 is undefined; it is set to `zero_division` as scikit-learn's
    `f1_score(zero_division=...)` does: 0.0 (the default: the number sklearn's default 'warn' yields, so
    our means equal sklearn's), 1.0, or NaN (then the mean skips it, like sklearn's macro average).
    """
    if not (zero_division in (0.0, 1.0) or (isinstance(zero_division, float) and math.isnan(zero_division))):
        raise ValueError(f"zero_division must be 0.0, 1.0 or nan (as in scikit-learn), got {zero_division!r}")
    r = _occurrence("reference", _matrix("reference", reference))
    p = _occurrence("prediction", _matrix("prediction", prediction))
    _same_shape("reference", r, "prediction", p)
    tp = (r & p).sum(axis=0)
    denom = 2 * tp + (~r & p).sum(axis=0) + (r & ~p).sum(axis=0)
    f1 = np.full(NUM_AUS, zero_division, dtype=np.float64)
    np.divide(2.0 * tp, denom, out=f1, where=denom > 0)
    return PerAU(f1, _mean(f1))


def _mean(x: np.ndarray) -> float:
    """Mean that skips NaN; NaN (without a RuntimeWarning) when everything is NaN."""
    ok = ~np.isnan(x)
    return float(x[ok].mean()) if ok.any() else float("nan")


# ---------------------------------------------------------------------------------------------
# ICC(3,1)


def _two_way_mean_squares(y: np.ndarray) -> tuple[float, float, float]:
    """(BMS, JMS, EMS) of the two-way ANOVA without replication of an (n targets, k raters) matrix."""
    n, k = y.shape
    grand = y.mean()
    row = y.mean(axis=1) - grand
    col = y.mean(axis=0) - grand
    resid = y - grand - row[:, None] - col[None, :]
    bms = k * float(row @ row) / (n - 1)
    jms = n * float(col @ col) / (k - 1)
    ems = float((resid * resid).sum()) / ((n - 1) * (k - 1))
    return bms, jms, ems


def icc3_1(ratings: npt.ArrayLike) -> float:
    """ICC(3,1) of an (n targets, k raters) matrix: two-way mixed, consistency, single rater.

    (BMS - EMS) / (BMS + (k - 1) EMS), Shrout & Fleiss (1979). Consistency: a constant offset of one rater
    (a detector biased by +0.5 intensity) does not lower it; MAE is what sees the bias.
    Returns NaN when the denominator is 0, i.e. the ratings have no target or residual variance (for
    example an AU that is constant in both reference and prediction): agreement is then undefined, and
    NaN keeps it out of `np.nanmean` rather than faking 0 or 1. "0" allows for float rounding.
    """
    y = _matrix("ratings", ratings, cols=None).astype(np.float64)
    n, k = y.shape
    if n < 2 or k < 2:
        raise ValueError(f"ratings must be (n targets, k raters) with n >= 2 and k >= 2, got shape {y.shape}")
    bms, _, ems = _two_way_mean_squares(y)
    den = bms + (k - 1) * ems
    # rounding noise of the sums of squares is ~ (a few ulp of max|y|)^2 per cell; a real variance is far above it
    noise = n * k * (1e3 * np.finfo(np.float64).eps * float(np.abs(y).max())) ** 2
    if den <= noise:
        return float("nan")
    return (bms - ems) / den


def icc_per_au(reference: npt.ArrayLike, prediction: npt.ArrayLike) -> np.ndarray:
    """ICC(3,1) of each AU with k = 2 raters (reference, prediction): (BMS - EMS) / (BMS + EMS); (12,), NaN if undefined."""
    r = _matrix("reference", reference, min_rows=2).astype(np.float64)
    p = _matrix("prediction", prediction, min_rows=2).astype(np.float64)
    _same_shape("reference", r, "prediction", p)
    return np.array([icc3_1(np.stack([r[:, i], p[:, i]], axis=1)) for i in range(NUM_AUS)])


# ---------------------------------------------------------------------------------------------
# MAE


def mae_per_au(reference: npt.ArrayLike, prediction: npt.ArrayLike) -> PerAU:
    """Mean |y - y_hat| of each AU's intensity (0-5 scale) over the samples, and the mean over AUs."""
    r = _matrix("reference", reference).astype(np.float64)
    p = _matrix("prediction", prediction).astype(np.float64)
    _same_shape("reference", r, "prediction", p)
    mae = np.abs(r - p).mean(axis=0)
    return PerAU(mae, float(mae.mean()))


# ---------------------------------------------------------------------------------------------
# Jaccard


def jaccard_rows(a_bool: npt.ArrayLike, b_bool: npt.ArrayLike, mask: npt.ArrayLike | None = None) -> np.ndarray:
    """Jaccard |A and B| / |A or B| of each row's AU sets, (n,); `core.facs.jaccard` vectorised.

    `mask` (bool, (12,) or (n, 12)) restricts both sets to the masked AUs, e.g. those a detector covers.
    Two empty sets count as 1.0 (they agree), as in docs/facs.md.
    """
    x = _binary("a_bool", _matrix("a_bool", a_bool, min_rows=0))
    y = _binary("b_bool", _matrix("b_bool", b_bool, min_rows=0))
    _same_shape("a_bool", x, "b_bool", y)
    if mask is not None:
        m = np.asarray(mask)
        if m.dtype != bool:
            raise ValueError(f"mask must be a boolean array (not AU indices), got dtype {m.dtype}")
        if m.shape not in ((NUM_AUS,), x.shape):
            raise ValueError(f"mask must have shape ({NUM_AUS},) or {x.shape}, got {m.shape}")
        x, y = x & m, y & m
    inter = (x & y).sum(axis=1)
    union = (x | y).sum(axis=1)
    out = np.ones(len(x), dtype=np.float64)
    np.divide(inter, union, out=out, where=union > 0)
    return out


# ---------------------------------------------------------------------------------------------
# Frechet distance


def _sqrtm_product(s_a: np.ndarray, s_b: np.ndarray) -> tuple[np.ndarray, bool]:
    """sqrtm(S_a S_b), and whether scipy found the product singular (or returned non-finite values)."""
    from scipy import linalg

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        root = linalg.sqrtm(s_a @ s_b)
    singular = any(issubclass(w.category, linalg.LinAlgWarning) for w in caught) or not np.isfinite(root).all()
    return np.asarray(root), singular


def frechet_distance(feats_a: npt.ArrayLike, feats_b: npt.ArrayLike, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussian fits of two feature sets (n_a, d) and (n_b, d): the FID formula.

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)), S the unbiased sample covariances. When S_a S_b is
    singular (fewer samples than dimensions, a constant feature) the square root is taken of
    (S_a + eps I)(S_b + eps I), as the FID reference implementation does; the tiny imaginary part that
    sqrtm's rounding leaves is dropped, a large one is an error. Only comparable across runs with the same
    feature network, pre-processing and sample counts (the estimate is biased by n).
    """
    a = _matrix("feats_a", feats_a, cols=None, min_rows=0).astype(np.float64)
    b = _matrix("feats_b", feats_b, cols=None, min_rows=0).astype(np.float64)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets have different dimensions: feats_a {a.shape} vs feats_b {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples per set to fit a Gaussian, got feats_a {a.shape}, feats_b {b.shape}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a small positive number, got {eps!r}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    s_a = np.atleast_2d(np.cov(a, rowvar=False))
    s_b = np.atleast_2d(np.cov(b, rowvar=False))
    root, singular = _sqrtm_product(s_a, s_b)
    if singular:
        off = eps * np.eye(len(s_a))
        root, singular = _sqrtm_product(s_a + off, s_b + off)
        if singular:
            raise ValueError("sqrtm(S_a S_b) failed even with eps added to the diagonals; try a larger eps")
    if np.iscomplexobj(root):
        imag = float(np.abs(np.diagonal(root).imag).max())
        scale = max(1.0, float(np.abs(np.diagonal(root).real).max()))
        if imag > _IMAG_TOL * scale:
            raise ValueError(f"sqrtm(S_a S_b) has an imaginary component of {imag:.3g}: the covariances are ill-posed")
        root = root.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(s_a) + np.trace(s_b) - 2.0 * np.trace(root))


# ---------------------------------------------------------------------------------------------
# ROC AUC


def roc_auc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney U) identity, ties counted half."""
    from scipy.stats import rankdata

    y = np.asarray(labels).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels {np.shape(labels)} and scores {np.shape(scores)} must have the same size")
    if not np.isfinite(s).all():
        raise ValueError("scores hold NaN/inf; drop or impute them first")
    y = _binary("labels", y[:, None])[:, 0]
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        raise ValueError(f"ROC AUC needs both positive and negative labels, got {pos} positive, {neg} negative")
    ranks = rankdata(s)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


# ---------------------------------------------------------------------------------------------
# report


def _json_number(x: float, digits: int = 4) -> float | None:
    """Rounded for reading; NaN becomes None (JSON has no NaN)."""
    return None if math.isnan(x) else round(float(x), digits)


def au_report(
    reference_int: npt.ArrayLike,
    predicted_prob_or_occ: npt.ArrayLike,
    predicted_int: npt.ArrayLike | None,
    threshold: int,
    reference_occurrence: npt.ArrayLike | None = None,
) -> dict[str, Any]:
    """JSON-ready per-AU F1 (plus ICC(3,1) and MAE when predicted intensities are given), keyed "AU1".."AU26".

    `reference_int`: (n, 12) intensities on 0-5; reference occurrence = intensity >= `threshold`, unless
    `reference_occurrence` (n, 12 bool) is given (e.g. a detector consensus whose occurrence is its own vote).
    `predicted_prob_or_occ`: (n, 12) occurrence probabilities or booleans. `predicted_int`: (n, 12) intensities or None.
    Numbers are rounded to 4 digits; an undefined ICC is None, and `icc_mean` is the mean of the defined ones.
    `support` is the number of reference positives per AU (an F1 of 0 with support 0 means "never occurs").
    """
    ref = _matrix("reference_int", reference_int).astype(np.float64)
    if reference_occurrence is None:
        ref_occ = ref >= threshold
    else:
        ref_occ = _binary("reference_occurrence", _matrix("reference_occurrence", reference_occurrence))
        _same_shape("reference_int", ref, "reference_occurrence", ref_occ)
    f1 = f1_per_au(ref_occ, predicted_prob_or_occ)
    out: dict[str, Any] = {
        "f1": {k: _json_number(v) for k, v in zip(AU_KEYS, f1.per_au)},
        "f1_mean": _json_number(f1.mean),
        "support": {k: int(v) for k, v in zip(AU_KEYS, ref_occ.sum(axis=0))},
    }
    if predicted_int is not None:
        pred_int = _matrix("predicted_int", predicted_int).astype(np.float64)
        _same_shape("reference_int", ref, "predicted_int", pred_int)
        icc = icc_per_au(ref, pred_int)
        mae = mae_per_au(ref, pred_int)
        out["icc"] = {k: _json_number(v) for k, v in zip(AU_KEYS, icc)}
        out["icc_mean"] = _json_number(_mean(icc))
        out["mae"] = {k: _json_number(v) for k, v in zip(AU_KEYS, mae.per_au)}
        out["mae_mean"] = _json_number(mae.mean)
    return out
