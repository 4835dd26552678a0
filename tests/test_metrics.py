"""AU metrics against references: scikit-learn's F1 and ROC AUC, ICC(3,1) worked by hand and from
Shrout & Fleiss (1979), the FID formula in closed form, and core.facs.jaccard."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from core import facs
from detectors import metrics
from detectors.metrics import (
    au_report,
    f1_per_au,
    frechet_distance,
    icc3_1,
    icc_per_au,
    jaccard_rows,
    mae_per_au,
    roc_auc,
)

# ---------------------------------------------------------------------------------------------
# F1


def _labels(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Reference occurrences and predicted probabilities, with the awkward columns F1 has to define."""
    rng = np.random.default_rng(seed)
    ref = rng.random((n, 12)) < rng.uniform(0.05, 0.6, 12)
    prob = np.clip(ref * 0.5 + rng.random((n, 12)) * 0.6, 0.0, 1.0)
    ref[:, 7], prob[:, 7] = False, 0.1  # no positives in reference nor prediction: zero_division applies
    ref[:, 3], prob[:, 3] = True, 0.2  # positives, none predicted: F1 = 0 whatever zero_division says
    prob[:5, 0] = 0.5  # exactly at the threshold counts as positive
    return ref, prob


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("zero_division", [0.0, 1.0, np.nan])
def test_f1_matches_sklearn(seed, zero_division):
    ref, prob = _labels(seed)
    ours = f1_per_au(ref, prob, zero_division=zero_division)
    pred = prob >= 0.5
    theirs = f1_score(ref, pred, average=None, zero_division=zero_division)
    np.testing.assert_allclose(ours.per_au, theirs, atol=1e-12)
    per_column = [f1_score(ref[:, j], pred[:, j], zero_division=zero_division) for j in range(12)]
    np.testing.assert_allclose(ours.per_au, per_column, atol=1e-12)
    assert ours.mean == pytest.approx(f1_score(ref, pred, average="macro", zero_division=zero_division), abs=1e-12)
    assert ours.per_au[3] == 0.0
    np.testing.assert_equal(ours.per_au[7], zero_division)


def test_f1_default_is_zero_and_booleans_equal_probabilities():
    ref, prob = _labels(5)
    per_au, mean = f1_per_au(ref, prob)  # unpacks like a tuple
    assert per_au.shape == (12,) and per_au[7] == 0.0
    np.testing.assert_array_equal(per_au, f1_per_au(ref.astype(float), prob >= 0.5).per_au)
    assert mean == pytest.approx(per_au.mean())


# ---------------------------------------------------------------------------------------------
# ICC(3,1)

# Shrout & Fleiss (1979), Table 2: 6 targets (rows) rated by 4 judges (columns).
SHROUT_FLEISS = np.array(
    [[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]], dtype=float
)


def test_icc31_shrout_fleiss_table():
    """The paper's ANOVA: BMS 11.24, JMS 32.49, EMS 1.02 and ICC(3,1) = 0.71.

    Exactly: BSS = 1349/24, ESS = 367/24, so BMS = 1349/120, EMS = 367/360 and
    ICC(3,1) = (BMS - EMS) / (BMS + 3 EMS) = (4047 - 367) / (4047 + 1101) = 3680/5148 = 920/1287 = 0.71484.
    """
    bms, jms, ems = metrics._two_way_mean_squares(SHROUT_FLEISS)
    assert (round(bms, 2), round(jms, 2), round(ems, 2)) == (11.24, 32.49, 1.02)
    assert icc3_1(SHROUT_FLEISS) == pytest.approx(920 / 1287, abs=1e-12)
    assert round(icc3_1(SHROUT_FLEISS), 2) == 0.71
    # consistency: shifting any judge by a constant changes nothing
    assert icc3_1(SHROUT_FLEISS + np.array([0.0, 3.0, -1.5, 10.0])) == pytest.approx(920 / 1287, abs=1e-12)


def test_icc31_two_raters_by_hand():
    """n = 3 targets, k = 2 raters: reference (1, 3, 5), prediction (2, 3, 7).

    Grand mean 21/6 = 3.5; target means 1.5, 3, 6.
    BSS = k * sum((target mean - 3.5)^2) = 2 * (4 + 0.25 + 6.25) = 21,  BMS = 21 / (n-1) = 10.5.
    Rater means 3, 4: JSS = n * (0.25 + 0.25) = 1.5.
    TSS = 6.25 + 2.25 + 0.25 + 0.25 + 2.25 + 12.25 = 23.5,  ESS = 23.5 - 21 - 1.5 = 1,
    EMS = 1 / ((n-1)(k-1)) = 0.5.  ICC(3,1) = (10.5 - 0.5) / (10.5 + 0.5) = 10/11.
    """
    y = np.array([[1, 2], [3, 3], [5, 7]], dtype=float)
    bms, jms, ems = metrics._two_way_mean_squares(y)
    assert (bms, jms, ems) == pytest.approx((10.5, 1.5, 0.5), abs=1e-12)
    assert icc3_1(y) == pytest.approx(10 / 11, abs=1e-12)
    assert icc3_1(y + np.array([0.0, 2.5])) == pytest.approx(10 / 11, abs=1e-12)  # a biased rater: same ICC
    per = icc_per_au(np.tile(y[:, :1], (1, 12)), np.tile(y[:, 1:], (1, 12)))
    assert per.shape == (12,)
    np.testing.assert_allclose(per, 10 / 11, atol=1e-12)


def test_icc_per_au_matches_the_two_rater_closed_form():
    """With k = 2, (BMS - EMS) / (BMS + EMS) = 2 cov(x, y) / (var x + var y): an independent formula."""
    rng = np.random.default_rng(6)
    ref = rng.integers(0, 6, (200, 12)).astype(float)
    pred = np.clip(ref + rng.normal(0, 0.8 + 0.1 * np.arange(12), (200, 12)), 0, 5)
    want = [
        2 * np.cov(ref[:, j], pred[:, j])[0, 1] / (ref[:, j].var(ddof=1) + pred[:, j].var(ddof=1)) for j in range(12)
    ]
    np.testing.assert_allclose(icc_per_au(ref, pred), want, atol=1e-12)


def test_icc_is_nan_for_constant_ratings():
    assert np.isnan(icc3_1(np.full((5, 2), 3.0)))
    assert np.isnan(icc3_1(np.zeros((4, 3))))
    # identical rows (an AU that never moves, predicted at a constant 0.3): 0/0 up to rounding -> NaN
    assert np.isnan(icc3_1(np.column_stack([np.zeros(7), np.full(7, 0.3)])))
    ref = np.ones((6, 12))
    ref[:, 0] = [0, 1, 2, 3, 4, 5]
    per = icc_per_au(ref, ref.copy())
    assert per[0] == pytest.approx(1.0) and np.isnan(per[1:]).all()


# ---------------------------------------------------------------------------------------------
# MAE, Jaccard


def test_mae_per_au_is_a_direct_mean():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 6, (50, 12))
    b = rng.uniform(0, 5, (50, 12))
    mae = mae_per_au(a, b)
    want = [sum(abs(float(a[i, j]) - float(b[i, j])) for i in range(50)) / 50 for j in range(12)]
    np.testing.assert_allclose(mae.per_au, want, atol=1e-12)
    assert mae.mean == pytest.approx(np.mean(want))


def test_jaccard_is_reexported_and_rows_match_it():
    assert metrics.jaccard is facs.jaccard
    rng = np.random.default_rng(4)
    x, y = rng.random((60, 12)) < 0.3, rng.random((60, 12)) < 0.3
    x[0], y[0] = False, False  # both empty -> 1
    rows = jaccard_rows(x, y)
    assert rows.shape == (60,) and rows[0] == 1.0
    np.testing.assert_allclose(rows, [facs.jaccard(x[i], y[i]) for i in range(60)], atol=1e-15)
    np.testing.assert_array_equal(jaccard_rows(x.astype(int), y.astype(float)), rows)  # 0/1 numbers are fine


def test_jaccard_rows_mask():
    rng = np.random.default_rng(5)
    x, y = rng.random((40, 12)) < 0.4, rng.random((40, 12)) < 0.4
    mask = np.zeros(12, bool)
    mask[[0, 2, 6, 10]] = True
    masked = jaccard_rows(x, y, mask)
    np.testing.assert_allclose(masked, [facs.jaccard(x[i] & mask, y[i] & mask) for i in range(40)], atol=1e-15)
    # only the masked AUs count: disagreement outside the mask is invisible
    x2 = x.copy()
    x2[:, ~mask] = ~x2[:, ~mask]
    np.testing.assert_array_equal(jaccard_rows(x2, y, mask), masked)
    assert (jaccard_rows(x, y, np.zeros(12, bool)) == 1.0).all()  # nothing masked in: both sets empty
    np.testing.assert_array_equal(jaccard_rows(x, y, np.tile(mask, (40, 1))), masked)  # per-row mask
    with pytest.raises(ValueError, match="mask must be a boolean array"):
        jaccard_rows(x, y, [0, 2, 6])
    with pytest.raises(ValueError, match=r"mask must have shape \(12,\)"):
        jaccard_rows(x, y, np.ones(11, bool))


# ---------------------------------------------------------------------------------------------
# Frechet distance


def _exact_gaussian_sample(rng, n: int, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """n points whose sample mean is exactly `mean` and sample covariance exactly diag(`var`).

    Columns of Q are orthonormal and orthogonal to the ones vector (QR of centred noise), so
    sqrt(n - 1) Q has zero column means and identity sample covariance.
    """
    z = rng.normal(size=(n, len(mean)))
    q, _ = np.linalg.qr(z - z.mean(axis=0))
    return mean + np.sqrt(n - 1) * q * np.sqrt(var)


def _frechet_by_eigh(a: np.ndarray, b: np.ndarray) -> float:
    """The FID formula on the sample moments, Tr sqrt(S_a S_b) = Tr sqrt(S_a^1/2 S_b S_a^1/2) (symmetric PSD) via eigh."""
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_root = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * tr_root)


@pytest.mark.filterwarnings("error")  # no LinAlgWarning or ComplexWarning may leak
def test_frechet_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(7)
    mu_a, var_a = np.array([0.0, 1.0, -2.0, 0.5, 3.0]), np.array([1.0, 4.0, 0.25, 2.0, 9.0])
    mu_b, var_b = np.array([1.0, 1.0, 0.0, 0.5, -1.0]), np.array([2.0, 1.0, 1.0, 0.5, 4.0])
    a = _exact_gaussian_sample(rng, 400, mu_a, var_a)
    b = _exact_gaussian_sample(rng, 250, mu_b, var_b)
    np.testing.assert_allclose(np.cov(b, rowvar=False), np.diag(var_b), atol=1e-10)
    want = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()
    assert frechet_distance(a, b) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(b, a) == pytest.approx(want, rel=1e-9)
    assert abs(frechet_distance(a, a)) <= 1e-6 * np.trace(np.cov(a, rowvar=False))


@pytest.mark.filterwarnings("error")
def test_frechet_general_covariances_against_sample_moments():
    rng = np.random.default_rng(8)
    a = rng.normal(size=(800, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6)) + 0.7
    d = frechet_distance(a, b)
    assert d == pytest.approx(frechet_distance(b, a), rel=1e-8)
    assert abs(frechet_distance(a, a.copy())) <= 1e-6 * np.trace(np.cov(a, rowvar=False))
    assert d == pytest.approx(_frechet_by_eigh(a, b), rel=1e-8)


@pytest.mark.filterwarnings("error")
def test_frechet_rank_deficient_and_singular_covariances(monkeypatch):
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=(5, 10)), rng.normal(size=(4, 10)) + 0.3  # fewer samples than dimensions
    d = frechet_distance(a, b)
    assert d == pytest.approx(_frechet_by_eigh(a, b), rel=1e-6)
    assert d == pytest.approx(frechet_distance(b, a), rel=1e-6)
    # a feature constant in both sets makes S_a S_b exactly singular: scipy warns, the eps offset is used,
    # and the constant feature contributes (almost) nothing
    singular_flags = []
    real = metrics._sqrtm_product

    def spy(s_a, s_b):
        root, singular = real(s_a, s_b)
        singular_flags.append(singular)
        return root, singular

    monkeypatch.setattr(metrics, "_sqrtm_product", spy)
    a2, b2 = rng.normal(size=(300, 3)), rng.normal(size=(200, 3)) * 2
    with_const = frechet_distance(np.column_stack([a2, np.ones(300)]), np.column_stack([b2, np.ones(200)]))
    assert singular_flags == [True, False]  # retried once, with the offset, and that one was fine
    assert with_const == pytest.approx(frechet_distance(a2, b2), abs=1e-4)


def test_frechet_errors():
    a = np.zeros((10, 4))
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(a, np.zeros((10, 5)))
    with pytest.raises(ValueError, match="at least 2 samples"):
        frechet_distance(a, np.zeros((1, 4)))
    with pytest.raises(ValueError, match="feats_b holds NaN"):
        frechet_distance(a, np.full((10, 4), np.nan))
    with pytest.raises(ValueError, match=r"feats_a must have shape \(n, d\)"):
        frechet_distance(np.zeros(10), a)


# ---------------------------------------------------------------------------------------------
# ROC AUC, report, shape errors


def test_roc_auc_matches_sklearn_with_ties():
    rng = np.random.default_rng(10)
    y = rng.random(400) < 0.4
    s = np.round(y * 0.3 + rng.random(400), 1)  # rounding makes ties
    assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    with pytest.raises(ValueError, match="both positive and negative"):
        roc_auc(np.ones(5), np.arange(5))


def test_au_report_is_json_ready_and_keyed_by_au():
    rng = np.random.default_rng(11)
    ref = rng.integers(0, 6, (80, 12)).astype(float)
    ref[:, 11] = 0  # AU26 never occurs, constant intensity: ICC undefined
    pred_int = np.clip(ref + rng.normal(0, 0.5, ref.shape), 0, 5)
    pred_int[:, 11] = 0
    prob = np.clip(pred_int / 5 + 0.1, 0, 1)
    rep = au_report(ref, prob, pred_int, 2)
    json.dumps(rep, allow_nan=False)
    keys = [f"AU{a}" for a in facs.AUS]
    assert list(rep["f1"]) == keys == list(rep["icc"]) == list(rep["mae"]) == list(rep["support"])
    f1 = f1_per_au(ref >= 2, prob)
    assert rep["f1"]["AU1"] == round(f1.per_au[0], 4) and rep["f1_mean"] == round(f1.mean, 4)
    assert rep["support"]["AU1"] == int((ref[:, 0] >= 2).sum()) and rep["support"]["AU26"] == 0
    assert rep["icc"]["AU26"] is None
    icc = icc_per_au(ref, pred_int)
    assert rep["icc_mean"] == round(float(np.nanmean(icc)), 4)
    assert rep["mae_mean"] == round(mae_per_au(ref, pred_int).mean, 4)
    assert set(au_report(ref, prob, None, 2)) == {"f1", "f1_mean", "support"}
    # an explicit reference occurrence overrides the threshold
    occ = np.zeros((80, 12), bool)
    assert au_report(ref, prob, None, 2, reference_occurrence=occ)["support"]["AU1"] == 0


def test_bad_inputs_say_what_they_got():
    ok = np.zeros((4, 12))
    with pytest.raises(ValueError, match=r"reference_int must have shape \(n, 12\).*got shape \(4, 11\)"):
        au_report(np.zeros((4, 11)), np.zeros((4, 11)), None, 2)
    with pytest.raises(ValueError, match=r"got shape \(12, 4\)"):
        f1_per_au(ok.T, ok.T)
    with pytest.raises(ValueError, match=r"\(4, 12\) and prediction \(5, 12\) must have the same shape"):
        f1_per_au(ok, np.zeros((5, 12)))
    with pytest.raises(ValueError, match="threshold intensities first"):
        f1_per_au(ok, np.full((4, 12), 3.0))  # intensities passed where probabilities belong
    with pytest.raises(ValueError, match="prediction holds NaN"):
        f1_per_au(ok, np.full((4, 12), np.nan))
    with pytest.raises(ValueError, match="zero_division"):
        f1_per_au(ok, ok, zero_division="warn")
    with pytest.raises(ValueError, match="must be boolean"):
        jaccard_rows(np.full((4, 12), 3), ok)
    with pytest.raises(ValueError, match="n >= 2 and k >= 2"):
        icc3_1(np.zeros((5, 1)))
    with pytest.raises(ValueError, match="at least 2 row"):
        icc_per_au(np.zeros((1, 12)), np.zeros((1, 12)))
    with pytest.raises(ValueError, match="predicted_int"):
        au_report(ok, ok, np.zeros((3, 12)), 2)
    with pytest.raises(ValueError, match="must have shape"):
        mae_per_au(np.zeros(12), np.zeros(12))
