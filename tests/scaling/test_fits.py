"""Scaling-law fits against the laws that generated the data and a brute-force compute optimum."""

import json

import numpy as np
import pytest

from jaxlm.scaling import (
    ChinchillaFit,
    compute_frontier,
    compute_optimal,
    fit_chinchilla,
    fit_isoflop,
    fit_power_law,
    fit_results,
    fit_runs,
)

# Realistic ground truth: reducible loss ~1 nat at N = 1e6, D = 1e8.
TRUE = {"E": 1.8, "A": 400.0, "B": 1200.0, "alpha": 0.35, "beta": 0.30}
# Hoffmann et al. (2022), approach 3 estimates.
PUBLISHED = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def _law(N, D, E, A, B, alpha, beta):
    return E + A / np.asarray(N) ** alpha + B / np.asarray(D) ** beta


def _brute_force_optimum(C, law=TRUE):
    """(N, L) minimising the law along D = C/(6N), by scanning a dense log grid of N."""
    N = np.geomspace(1e3, 1e15, 600_001)  # steps of 2e-5 decades
    L = _law(N, C / (6 * N), **law)
    i = int(L.argmin())
    assert 0 < i < N.size - 1, "optimum at the edge of the scanned range"
    return N[i], L[i]


def _noisy(L, rng, sigma):
    return L * np.exp(sigma * rng.standard_normal(np.shape(L)))


def _grid_runs(seed, sigma=0.005):
    """6 model sizes x 6 token counts, independent of each other, with log-normal noise."""
    N, D = (v.ravel() for v in np.meshgrid(np.geomspace(1e6, 1e9, 6), np.geomspace(1e8, 1e11, 6)))
    return N, D, _noisy(_law(N, D, **TRUE), np.random.default_rng(seed), sigma)


def _isoflop_runs(seed, sigma=0.005):
    """5 budgets x 7 sizes spanning 0.1x..10x the true optimum, D = C/(6N), labelled by budget."""
    rng = np.random.default_rng(seed)
    N, C, budget = [], [], []
    for c in np.geomspace(1e17, 1e21, 5):
        n_opt, _ = _brute_force_optimum(c)
        for n in n_opt * np.geomspace(0.1, 10, 7):
            N.append(n)
            C.append(c)
            budget.append(f"{c:.0e}")
    N, C = np.array(N), np.array(C)
    C = C * np.exp(1e-3 * rng.standard_normal(C.size))  # whole steps: C is only nominal
    D = C / (6 * N)
    return N, D, C, _noisy(_law(N, D, **TRUE), rng, sigma), budget


@pytest.fixture(scope="module")
def chinchilla_fit():
    N, D, L = _grid_runs(seed=0)
    return fit_chinchilla(N, D, L, bootstrap=100, seed=0)


def test_chinchilla_recovers_exponents(chinchilla_fit):
    fit = chinchilla_fit
    assert fit.alpha == pytest.approx(TRUE["alpha"], rel=0.05)
    assert fit.beta == pytest.approx(TRUE["beta"], rel=0.05)
    np.testing.assert_allclose(fit.E, TRUE["E"], rtol=0.05)
    assert fit.a == pytest.approx(TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]), abs=0.02)
    # A and alpha trade off against each other, so compare predictions rather than A and B.
    N, D = np.meshgrid(np.geomspace(2e6, 5e8, 9), np.geomspace(2e8, 5e10, 9))
    np.testing.assert_allclose(fit.loss(N, D), _law(N, D, **TRUE), rtol=0.005)


def test_chinchilla_bootstrap_interval_contains_truth(chinchilla_fit):
    fit = chinchilla_fit
    assert fit.n_boot == 100
    for name in ("alpha", "beta", "E"):
        lo, hi = fit.ci[name]
        assert lo <= TRUE[name] <= hi, (name, fit.ci[name])
        assert lo <= getattr(fit, name) <= hi
    lo, hi = fit.ci["a"]
    assert lo <= TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"]) <= hi


def test_chinchilla_objective_is_the_huber_sum(chinchilla_fit):
    N, D, L = _grid_runs(seed=0)
    f = chinchilla_fit
    r = np.log(_law(N, D, f.E, f.A, f.B, f.alpha, f.beta)) - np.log(L)
    delta = 1e-3
    huber = np.where(np.abs(r) <= delta, r**2 / 2, delta * (np.abs(r) - delta / 2))
    assert f.objective == pytest.approx(huber.sum(), rel=1e-9)


def test_chinchilla_exact_data_is_fit_exactly():
    N, D, _ = _grid_runs(seed=0)
    fit = fit_chinchilla(N, D, _law(N, D, **TRUE), n_starts=8)
    assert fit.alpha == pytest.approx(TRUE["alpha"], rel=1e-3)
    assert fit.beta == pytest.approx(TRUE["beta"], rel=1e-3)
    np.testing.assert_allclose([fit.A, fit.B], [TRUE["A"], TRUE["B"]], rtol=0.02)


def test_isoflop_recovers_allocation_exponents():
    N, _, C, L, budget = _isoflop_runs(seed=0)
    fit = fit_isoflop(N, C, L, budget, bootstrap=100, seed=0)
    a_true = TRUE["beta"] / (TRUE["alpha"] + TRUE["beta"])
    assert fit.a == pytest.approx(a_true, abs=0.05)
    assert fit.b == pytest.approx(1 - a_true, abs=0.05)
    assert fit.ci["a"][0] <= a_true <= fit.ci["a"][1]
    assert fit.n_boot > 90
    assert [c.budget for c in fit.curves] == sorted(set(budget), key=float)
    for curve in fit.curves:
        n_opt, l_opt = _brute_force_optimum(curve.C)
        # A parabola in ln N only approximates the skewed curve: a few % off is expected.
        assert curve.N_opt == pytest.approx(n_opt, rel=0.15)
        assert curve.L_opt == pytest.approx(l_opt, rel=0.01)
        assert curve.D_opt == pytest.approx(curve.C / (6 * curve.N_opt))
        # The fitted line through the per-budget minima.
        assert compute_optimal(curve.C, fit)[0] == pytest.approx(curve.N_opt, rel=0.1)


def test_compute_optimal_published_chinchilla_exponents():
    fit = ChinchillaFit(**PUBLISHED, objective=0.0, n_runs=0)
    (n1, d1), (n2, d2) = compute_optimal(1e20, fit), compute_optimal(1e24, fit)
    slope_n = np.log(n2 / n1) / np.log(1e4)
    slope_d = np.log(d2 / d1) / np.log(1e4)
    assert slope_n == pytest.approx(0.28 / 0.62, abs=1e-9)  # 0.4516...
    assert slope_d == pytest.approx(0.34 / 0.62, abs=1e-9)
    assert round(slope_n, 2) == 0.45 and round(slope_d, 2) == 0.55
    assert 6 * n1 * d1 == pytest.approx(1e20)


@pytest.mark.parametrize("C", [1e18, 1e21, 5.76e23])
@pytest.mark.parametrize("law", [PUBLISHED, TRUE], ids=["published", "synthetic"])
def test_compute_optimal_matches_brute_force(C, law):
    fit = ChinchillaFit(**law, objective=0.0, n_runs=0)
    N_opt, D_opt = compute_optimal(C, fit)
    n_ref, l_ref = _brute_force_optimum(C, law)
    assert N_opt == pytest.approx(n_ref, rel=1e-3)
    assert D_opt == pytest.approx(C / (6 * n_ref), rel=1e-3)
    assert _law(N_opt, D_opt, **law) <= l_ref + 1e-12


def test_compute_optimal_array_matches_scalars():
    fit = ChinchillaFit(**PUBLISHED, objective=0.0, n_runs=0)
    C = np.array([[1e19, 1e20], [1e21, 1e22]])
    N, D = compute_optimal(C, fit)
    assert N.shape == D.shape == C.shape
    for c, n, d in zip(C.ravel(), N.ravel(), D.ravel(), strict=True):
        assert (n, d) == pytest.approx(compute_optimal(float(c), fit), rel=1e-12)


def test_power_law_recovers_parameters():
    E, gamma = 1.8, 0.15
    k = 1.5 * 1e18**gamma  # reducible loss 1.5 at 1e18 FLOPs
    C = np.geomspace(1e15, 1e22, 15)
    L = _noisy(E + k * C**-gamma, np.random.default_rng(1), 0.002)
    fit = fit_power_law(C, L, bootstrap=200, seed=0)
    np.testing.assert_allclose(fit.E, E, rtol=0.02)
    assert fit.gamma == pytest.approx(gamma, rel=0.02)
    assert fit.k == pytest.approx(k, rel=0.05)
    np.testing.assert_allclose(fit.loss(C), E + k * C**-gamma, rtol=0.003)
    for name, value in (("E", E), ("k", k), ("gamma", gamma)):
        assert fit.ci[name][0] <= value <= fit.ci[name][1], name


def test_compute_frontier_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    C = 10 ** rng.uniform(15, 20, 60)
    L = 2 + rng.uniform(0, 1, 60) + 50 * C**-0.1
    got = compute_frontier(C, L)
    dominated = [any(C[j] <= C[i] and L[j] <= L[i] for j in range(60) if j != i) for i in range(60)]
    assert sorted(got.tolist()) == [i for i in range(60) if not dominated[i]]
    assert np.all(np.diff(C[got]) > 0) and np.all(np.diff(L[got]) < 0)


def _rows(N, D, C, L, budget):
    return [
        {"params": n, "tokens": d, "flops": c, "eval_loss": loss, "budget": b}
        for n, d, c, loss, b in zip(N, D, C, L, budget, strict=True)
    ]


def test_fit_results_reports_every_fit_as_json():
    N, D, C, L, budget = _isoflop_runs(seed=2)
    rows = _rows(N.tolist(), D.tolist(), C.tolist(), L.tolist(), budget)
    report = json.loads(json.dumps(fit_results(rows, targets=[1e22])))
    assert report["n_runs"] == len(rows) and report["skipped"] == {}
    assert report["chinchilla"]["alpha"] == pytest.approx(TRUE["alpha"], rel=0.05)
    assert report["isoflop"]["a"] == pytest.approx(fit_isoflop(N, C, L, budget).a)
    assert len(report["isoflop"]["curves"]) == 5
    (rec,) = report["compute_optimal"]
    # The recommendation is the brute-force optimum of the fitted law.
    fitted = {k: report["chinchilla"][k] for k in ("E", "A", "B", "alpha", "beta")}
    n_ref, l_ref = _brute_force_optimum(1e22, fitted)
    assert rec["chinchilla"]["params"] == pytest.approx(n_ref, rel=1e-3)
    assert rec["chinchilla"]["loss"] == pytest.approx(l_ref, rel=1e-9)
    assert rec["isoflop"]["params"] * rec["isoflop"]["tokens"] * 6 == pytest.approx(1e22, rel=0.05)
    assert rec["power_law"]["loss"] < min(L)


def test_fit_runs_skips_what_the_data_cannot_support():
    rows = [
        {"params": 1e6 * 2**i, "tokens": 1e9, "flops": 6e15 * 2**i, "eval_loss": 4.0 - 0.1 * i}
        for i in range(4)
    ]
    fits = fit_runs(rows)
    assert fits.chinchilla is None and "needs >= 5 runs; got 4" in fits.skipped["chinchilla"]
    assert fits.isoflop is None and "FLOP budgets" in fits.skipped["isoflop"]
    assert fits.power_law is not None and "power_law" not in fits.skipped
    np.testing.assert_array_equal(fits.N, [1e6, 2e6, 4e6, 8e6])


def _downward_budget():
    N = np.array([1e6, 1e7, 1e8, 1e6, 1e7, 1e8])
    L = np.array([3.0, 3.5, 3.0, 2.0, 1.5, 2.0])  # budget "b1" is an upside-down parabola
    return N, np.repeat([1e18, 1e19], 3), L, ["b1"] * 3 + ["b2"] * 3


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: fit_chinchilla([1e6] * 5, [1e9] * 4, [3.0] * 5), r"same length.*'D': 4"),
        (lambda: fit_chinchilla([1e6, 2e6, -1.0, 4e6, 5e6], [1e9] * 5, [3.0] * 5), r"N\[2\] = -1"),
        (lambda: fit_chinchilla([1e6] * 5, [1e9] * 5, [3, 3, np.nan, 3, 3]), r"L\[2\] = nan"),
        (lambda: fit_chinchilla([1e6] * 4, [1e9] * 4, [3.0] * 4), r">= 5 runs; got 4"),
        (lambda: fit_chinchilla([1e6] * 5, [1e9] * 5, [3.0] * 5, bootstrap=-1), r"got -1"),
        (lambda: fit_power_law([1e18, 1e19, 1e20], [3.0, 2.9, 2.8]), r">= 4 runs; got 3"),
        (lambda: fit_power_law([1e18, 0.0, 1e20, 1e21], [3.0] * 4), r"> 0; got C\[1\] = 0\.0"),
        (
            lambda: compute_optimal(0.0, ChinchillaFit(**PUBLISHED, objective=0, n_runs=0)),
            r"> 0 FLOPs; got 0\.0",
        ),
        (
            lambda: compute_optimal(
                [1e20, -5e20], ChinchillaFit(**PUBLISHED, objective=0, n_runs=0)
            ),
            r"-5e\+20",
        ),
        (
            lambda: fit_isoflop(
                [1e6, 2e6, 1e6, 2e6, 3e6],
                [1e18] * 2 + [1e19] * 3,
                [3.0] * 5,
                ["1e18"] * 2 + ["1e19"] * 3,
            ),
            r"budget '1e18' has 2 distinct",
        ),
        (lambda: fit_isoflop(*_downward_budget()), r"budget 'b1'.*opens downward"),
        (lambda: fit_isoflop([1e6, 2e6, 3e6], [1e18] * 3, [3.0] * 3, ["x"] * 3), r"got \['x'\]"),
        (lambda: fit_runs([{"params": 1e6, "tokens": 1e9, "flops": 6e15}]), r"\['eval_loss'\]"),
    ],
)
def test_bad_input_names_the_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_isoflop_warns_when_the_minimum_is_extrapolated():
    N = np.array([1e6, 2e6, 4e6] * 2)
    L = np.array([3.0, 2.8, 2.9, 2.9, 2.85, 2.83])  # second budget: minimum beyond the largest N
    with pytest.warns(UserWarning, match=r"budget 'b2'.*outside the sampled sizes"):
        fit_isoflop(N, np.repeat([1e18, 1e19], 3), L, ["b1"] * 3 + ["b2"] * 3)


def test_chinchilla_exponents_stay_non_negative_on_data_no_law_explains():
    """Loss that grows with N at fixed D (noise at tiny scale) must not give alpha < 0."""
    rng = np.random.default_rng(4)
    N = np.repeat([1e4, 2e4, 4e4, 8e4], 4)
    D = np.tile([1e5, 3e5, 1e6, 3e6], 4)
    L = 2.0 + 0.05 * np.log(N / 1e4) + 30 / D**0.3 + rng.normal(0, 0.002, N.size)
    fit = fit_chinchilla(N, D, L)
    assert fit.alpha >= 0 and fit.beta >= 0
    assert fit.beta > 0.1  # the D dependence is still found
