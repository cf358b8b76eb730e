"""Scaling-law fits to a table of training runs: Chinchilla approaches 2 and 3, L(C), bootstrap.

Symbols follow Hoffmann et al. (2022): N parameters, D training tokens, C ≈ 6·N·D training FLOPs,
L final eval loss. Everything here is NumPy/SciPy on the host; nothing is traced or compiled.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence, Sized
from typing import Any

import numpy as np
from scipy import optimize

ArrayLike = Sequence[float] | np.ndarray

# Hoffmann et al.'s initialisation grid for approach 3 (in the log parametrisation).
CHINCHILLA_INIT_GRID: Mapping[str, tuple[float, ...]] = {
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}
_THETA = ("e", "a", "b", "alpha", "beta")
_LBFGS = {"maxiter": 1000, "ftol": 1e-12, "gtol": 1e-10}
# alpha, beta >= 0: a loss that grows with N or D is noise, not a scaling law (unbounded, noisy
# small-scale data gave negative exponents with E near 0); e, a, b are free (logs).
_BOUNDS = [(None, None)] * 3 + [(0.0, None)] * 2


def _positive(name: str, values: Any) -> np.ndarray:
    """`values` as a 1-D float64 array, or a ValueError naming the first bad entry."""
    x = np.atleast_1d(np.asarray(values, dtype=np.float64))
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence; got shape {x.shape}")
    bad = np.flatnonzero(~np.isfinite(x) | (x <= 0))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{name} must be finite and > 0; got {name}[{i}] = {float(x[i])!r}")
    return x


def _same_length(**columns: Sized) -> int:
    lengths = {k: len(v) for k, v in columns.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs must have the same length; got lengths {lengths}")
    return next(iter(lengths.values()))


def _bootstrap(refit: Callable, n_boot: int, level: float, seed: int) -> tuple[dict, int]:
    """Percentile intervals of what `refit(rng)` returns over `n_boot` calls (None: no refit)."""
    rng = np.random.default_rng(seed)
    draws = [p for p in (refit(rng) for _ in range(n_boot)) if p is not None]
    tail = 50.0 * (1.0 - level)
    ci = {
        k: tuple(float(q) for q in np.percentile([d[k] for d in draws], [tail, 100.0 - tail]))
        for k in (draws[0] if draws else ())
    }
    return ci, len(draws)


def _fields_as_dict(fit: Any) -> dict[str, Any]:
    out = {f.name: getattr(fit, f.name) for f in dataclasses.fields(fit)}
    if "ci" in out:
        out["ci"] = {k: list(v) for k, v in out["ci"].items()}
    return out


def _jsonable(value: Any) -> Any:
    """A budget label as JSON: numbers and strings as they are, anything else as its repr."""
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value if isinstance(value, (int, float, str)) else repr(value)


def _check_bootstrap(bootstrap: int, ci_level: float) -> None:
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0 resamples; got {bootstrap}")
    if not 0.0 < ci_level < 1.0:
        raise ValueError(f"ci_level must be in (0, 1); got {ci_level}")


@dataclasses.dataclass(frozen=True)
class ChinchillaFit:
    """Fitted L(N, D) = E + A/N^alpha + B/D^beta; `ci` maps a parameter to its interval."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # sum of Huber losses of the log residuals at the optimum
    n_runs: int
    ci: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict, hash=False)
    n_boot: int = 0  # bootstrap refits that entered `ci`

    @property
    def a(self) -> float:
        """Exponent of N_opt ∝ C^a."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """Exponent of D_opt ∝ C^b."""
        return self.alpha / (self.alpha + self.beta)

    def loss(self, N: ArrayLike, D: ArrayLike) -> np.ndarray:
        """Predicted loss for N parameters trained on D tokens."""
        N, D = np.asarray(N, np.float64), np.asarray(D, np.float64)
        return self.E + self.A / N**self.alpha + self.B / D**self.beta

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable parameters, exponents and intervals."""
        return {**_fields_as_dict(self), "a": self.a, "b": self.b}


def _chinchilla_terms(theta: np.ndarray, logN: np.ndarray, logD: np.ndarray):
    """log L predicted by each parameter row (..., 5) and the softmax weights of its three terms."""
    e, a, b, alpha, beta = (theta[..., i, None] for i in range(5))
    terms = np.stack(np.broadcast_arrays(a - alpha * logN, b - beta * logD, e))
    top = terms.max(axis=0)
    w = np.exp(terms - top)
    total = w.sum(axis=0)
    return top + np.log(total), w / total


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    absr = np.abs(r)
    return np.where(absr <= delta, 0.5 * r * r, delta * (absr - 0.5 * delta))


def _chinchilla_objective(theta, logN, logD, logL, delta) -> tuple[float, np.ndarray]:
    """Hoffmann et al.'s Huber objective and its exact gradient in (e, a, b, alpha, beta)."""
    # The same maths as `_chinchilla_terms`, unrolled: L-BFGS calls this thousands of times.
    e, a, b, alpha, beta = theta
    t_n, t_d = a - alpha * logN, b - beta * logD
    top = np.maximum(np.maximum(t_n, t_d), e)
    w_n, w_d, w_e = np.exp(t_n - top), np.exp(t_d - top), np.exp(e - top)
    total = w_n + w_d + w_e
    r = top + np.log(total) - logL
    # dHuber/dr times d logsumexp / d term, which is the term's softmax weight.
    dr = np.clip(r, -delta, delta) / total
    grad = np.array([dr @ w_e, dr @ w_n, dr @ w_d, -(dr * w_n) @ logN, -(dr * w_d) @ logD])
    return float(_huber(r, delta).sum()), grad


def _chinchilla_grid(init_grid: Mapping[str, Sequence[float]]) -> np.ndarray:
    missing = set(_THETA) - set(init_grid)
    if missing:
        raise ValueError(f"init_grid needs keys {_THETA}; missing {sorted(missing)}")
    return np.array(list(itertools.product(*(init_grid[k] for k in _THETA))), np.float64)


def _one_blas_thread() -> contextlib.AbstractContextManager:
    # L-BFGS-B calls BLAS on tiny matrices every iteration; OpenBLAS's extra threads then spin
    # between calls, which doubles CPU use and, on a busy machine (pytest -n 2), slows the fits
    # several-fold. threadpoolctl is optional: without it the fits are only slower when busy.
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _chinchilla_minimise(starts, logN, logD, logL, delta) -> tuple[np.ndarray, float]:
    best_x, best_f = None, np.inf
    for x0 in starts:
        args = (logN, logD, logL, delta)
        res = optimize.minimize(
            _chinchilla_objective, x0, args, "L-BFGS-B", True, bounds=_BOUNDS, options=_LBFGS
        )
        if np.isfinite(res.fun) and res.fun < best_f:
            best_x, best_f = res.x, float(res.fun)
    if best_x is None:
        raise ValueError("approach 3: L-BFGS found no finite optimum from any start")
    return best_x, best_f


def _best_grid_starts(grid, logN, logD, logL, delta, k: int) -> np.ndarray:
    # One vectorised pass over the whole grid; L-BFGS then runs only from the k best starts.
    pred, _ = _chinchilla_terms(grid, logN, logD)
    values = _huber(pred - logL, delta).sum(axis=-1)
    return grid[np.argsort(values)[: k if k > 0 else None]]


def _theta_to_params(theta: np.ndarray) -> dict[str, float]:
    e, a, b, alpha, beta = (float(v) for v in theta)
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha, "beta": beta}


def fit_chinchilla(
    N: ArrayLike,
    D: ArrayLike,
    L: ArrayLike,
    *,
    delta: float = 1e-3,
    init_grid: Mapping[str, Sequence[float]] = CHINCHILLA_INIT_GRID,
    n_starts: int = 32,
    bootstrap: int = 0,
    ci_level: float = 0.95,
    seed: int = 0,
) -> ChinchillaFit:
    """Approach 3 of Hoffmann et al.: Huber fit of log L(N, D) with L-BFGS from a grid of starts.

    The objective is evaluated over the whole `init_grid` first and L-BFGS runs from the
    `n_starts` best points (0 runs from every point). Each of `bootstrap` resamples of the runs
    (with replacement) is refitted from the full-data optimum; `ci` holds percentile intervals at
    `ci_level`.
    """
    N, D, L = _positive("N", N), _positive("D", D), _positive("L", L)
    n = _same_length(N=N, D=D, L=L)
    if n < 5:
        raise ValueError(f"approach 3 fits 5 parameters and needs >= 5 runs; got {n}")
    if delta <= 0:
        raise ValueError(f"delta must be > 0; got {delta}")
    _check_bootstrap(bootstrap, ci_level)
    logN, logD, logL = np.log(N), np.log(D), np.log(L)
    starts = _best_grid_starts(_chinchilla_grid(init_grid), logN, logD, logL, delta, n_starts)

    def refit(rng: np.random.Generator) -> dict[str, float]:
        idx = rng.integers(0, n, n)
        args = (logN[idx], logD[idx], logL[idx], delta)
        # A resample's optimum lies in the full-data optimum's basin: restarting from the grid
        # too costs 5x and, in our checks, only ever reached the same basin or a worse one.
        p = _theta_to_params(_chinchilla_minimise([theta], *args)[0])
        fit = ChinchillaFit(**p, objective=0.0, n_runs=n)
        return p | {"a": fit.a, "b": fit.b}

    with _one_blas_thread():
        theta, objective = _chinchilla_minimise(starts, logN, logD, logL, delta)
        ci, kept = _bootstrap(refit, bootstrap, ci_level, seed)
    return ChinchillaFit(
        **_theta_to_params(theta), objective=objective, n_runs=n, ci=ci, n_boot=kept
    )


@dataclasses.dataclass(frozen=True)
class IsoFlopCurve:
    """One budget's parabola L = L_opt + curvature·(ln N − ln N_opt)² and the runs it was fit to."""

    budget: Hashable
    C: float  # geometric mean of the runs' FLOPs (nominally all equal within a budget)
    N_opt: float
    D_opt: float
    L_opt: float
    curvature: float
    N: tuple[float, ...]
    L: tuple[float, ...]

    def loss(self, N: ArrayLike) -> np.ndarray:
        """The parabola's loss at N parameters."""
        return self.L_opt + self.curvature * (np.log(np.asarray(N, np.float64) / self.N_opt)) ** 2


@dataclasses.dataclass(frozen=True)
class IsoFlopFit:
    """Approach 2: per-budget parabolas and the fits N_opt = k_N·C^a, D_opt = k_D·C^b."""

    curves: tuple[IsoFlopCurve, ...]  # sorted by C
    a: float
    k_N: float
    b: float
    k_D: float
    ci: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict, hash=False)
    n_boot: int = 0  # bootstrap refits that entered `ci`

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable exponents, per-budget minima (without the runs) and intervals."""
        out = _fields_as_dict(self)
        out["curves"] = [
            {k: v for k, v in _fields_as_dict(c).items() if k not in ("N", "L")}
            | {"budget": _jsonable(c.budget)}
            for c in self.curves
        ]
        return out


def _fit_parabola(budget: Hashable, C: float, N: np.ndarray, L: np.ndarray) -> IsoFlopCurve:
    sizes = np.unique(N)
    if sizes.size < 3:
        raise ValueError(
            f"budget {budget!r} has {sizes.size} distinct model sizes {sizes.tolist()}; "
            "a parabola needs >= 3"
        )
    x = np.log(N)
    centre = x.mean()  # centred for conditioning: ln N is ~20 and its square ~400
    c2, c1, c0 = np.polyfit(x - centre, L, 2)
    if c2 <= 0:
        raise ValueError(
            f"budget {budget!r}: loss vs ln N opens downward (curvature {c2:.3g} <= 0); "
            "add model sizes on both sides of the optimum"
        )
    x_opt = -c1 / (2 * c2)
    N_opt = math.exp(centre + x_opt)
    L_opt = float(c0 - c1 * c1 / (4 * c2))
    return IsoFlopCurve(
        budget, C, N_opt, C / (6 * N_opt), L_opt, float(c2), tuple(N.tolist()), tuple(L.tolist())
    )


def _isoflop_from_groups(groups, warn: bool) -> tuple[tuple[IsoFlopCurve, ...], dict]:
    curves = []
    for budget, C, N, L in groups:
        curve = _fit_parabola(budget, C, N, L)
        if warn and not N.min() <= curve.N_opt <= N.max():
            warnings.warn(
                f"budget {budget!r}: N_opt = {curve.N_opt:.3g} lies outside the sampled sizes "
                f"[{N.min():.3g}, {N.max():.3g}] (extrapolated)",
                stacklevel=3,
            )
        curves.append(curve)
    curves.sort(key=lambda c: c.C)
    logC = np.log([c.C for c in curves])
    a, log_kN = np.polyfit(logC, np.log([c.N_opt for c in curves]), 1)
    b, log_kD = np.polyfit(logC, np.log([c.D_opt for c in curves]), 1)
    params = {"a": float(a), "k_N": math.exp(log_kN), "b": float(b), "k_D": math.exp(log_kD)}
    return tuple(curves), params


def fit_isoflop(
    N: ArrayLike,
    C: ArrayLike,
    L: ArrayLike,
    budget: Sequence[Hashable],
    *,
    bootstrap: int = 0,
    ci_level: float = 0.95,
    seed: int = 0,
) -> IsoFlopFit:
    """Approach 2 of Hoffmann et al.: a parabola in ln N per FLOP budget, then power laws in C.

    Runs are grouped by their `budget` label; a budget's compute is the geometric mean of its runs'
    FLOPs. The bootstrap resamples runs with replacement within each budget (so every budget keeps
    its curve; a budget's draw is repeated until it has >= 3 distinct sizes) and skips resamples
    whose parabola opens downward; `n_boot` counts the refits kept.
    """
    N, C, L = _positive("N", N), _positive("C", C), _positive("L", L)
    _same_length(N=N, C=C, L=L, budget=budget)
    _check_bootstrap(bootstrap, ci_level)
    members: dict[Hashable, list[int]] = {}
    for i, label in enumerate(budget):
        members.setdefault(label, []).append(i)
    if len(members) < 2:
        raise ValueError(
            f"approach 2 needs >= 2 FLOP budgets to fit N_opt ∝ C^a; got {list(members)}"
        )
    index = {k: np.array(v) for k, v in members.items()}
    budget_C = {k: float(np.exp(np.log(C[v]).mean())) for k, v in index.items()}
    groups = [(k, budget_C[k], N[v], L[v]) for k, v in index.items()]
    curves, params = _isoflop_from_groups(groups, warn=True)

    def refit(rng: np.random.Generator) -> dict[str, float] | None:
        boot_groups = []
        for k, v in index.items():
            for _ in range(100):
                draw = rng.choice(v, size=v.size, replace=True)
                if np.unique(N[draw]).size >= 3:
                    break
            boot_groups.append((k, budget_C[k], N[draw], L[draw]))
        try:
            return _isoflop_from_groups(boot_groups, warn=False)[1]
        except ValueError:
            return None  # a resample whose parabola opens downward has no minimum to report

    ci, kept = _bootstrap(refit, bootstrap, ci_level, seed)
    return IsoFlopFit(curves, **params, ci=ci, n_boot=kept)


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """Fitted L(C) = E + k·C^(−gamma)."""

    E: float
    k: float
    gamma: float
    rmse: float  # of ln L
    n_runs: int
    ci: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict, hash=False)
    n_boot: int = 0

    def loss(self, C: ArrayLike) -> np.ndarray:
        """Predicted loss at C training FLOPs."""
        return self.E + self.k * np.asarray(C, np.float64) ** -self.gamma

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable parameters and intervals."""
        return _fields_as_dict(self)


def _power_law_solve(starts, x: np.ndarray, logL: np.ndarray) -> np.ndarray:
    """Least squares in ln L over (ln E, ln k', ln gamma) with x = ln(C / C_ref)."""

    def residual(p):
        E, k, g = np.exp(p)
        return np.log(E + k * np.exp(-g * x)) - logL

    def jacobian(p):
        E, k, g = np.exp(p)
        t = k * np.exp(-g * x)
        pred = E + t
        # Chain rule through the exp parametrisation: d/d ln E = E·∂/∂E, and so on.
        return np.stack([E / pred, t / pred, -g * x * t / pred], axis=1)

    best, best_cost = None, np.inf
    for p0 in starts:
        # A trial step may overflow exp(); the step is rejected and the search backs off.
        with np.errstate(over="ignore", invalid="ignore"):
            res = optimize.least_squares(residual, p0, jac=jacobian, method="lm", xtol=1e-12)
        if np.isfinite(res.cost) and res.cost < best_cost:
            best, best_cost = res.x, res.cost
    if best is None:
        raise ValueError("power law: least squares found no finite optimum from any start")
    return best


def _power_law_starts(x: np.ndarray, L: np.ndarray) -> list[np.ndarray]:
    starts = []
    for frac, gamma in itertools.product((0.2, 0.5, 0.8, 0.95), (0.03, 0.1, 0.3, 1.0)):
        E = frac * L.min()
        # k' that matches the data on average in log space for this E and gamma.
        k = math.exp(float(np.mean(np.log(L - E) + gamma * x)))
        starts.append(np.log([E, k, gamma]))
    return starts


def fit_power_law(
    C: ArrayLike, L: ArrayLike, *, bootstrap: int = 0, ci_level: float = 0.95, seed: int = 0
) -> PowerLawFit:
    """L(C) = E + k·C^(−gamma) by least squares in ln L from a few starts (E, k, gamma > 0).

    Fit it to compute-optimal runs (e.g. `compute_frontier`), not to every run. Bootstrap
    resamples runs with replacement and refits from the full-data optimum.
    """
    C, L = _positive("C", C), _positive("L", L)
    n = _same_length(C=C, L=L)
    if n < 4:
        raise ValueError(f"a power law in compute fits 3 parameters and needs >= 4 runs; got {n}")
    _check_bootstrap(bootstrap, ci_level)
    # Fitting against C/C_ref keeps k' near the losses instead of ~1e3..1e10.
    log_ref = float(np.log(C).mean())
    x, logL = np.log(C) - log_ref, np.log(L)
    p = _power_law_solve(_power_law_starts(x, L), x, logL)

    def to_params(p: np.ndarray) -> dict[str, float]:
        E, k, g = (float(v) for v in np.exp(p))
        return {"E": E, "k": k * math.exp(g * log_ref), "gamma": g}

    def refit(rng: np.random.Generator) -> dict[str, float] | None:
        idx = rng.integers(0, n, n)
        if len(np.unique(idx)) < 3:  # 3 parameters: a resample of fewer points says nothing
            return None
        try:
            return to_params(_power_law_solve([p], x[idx], logL[idx]))
        except OverflowError:  # a degenerate resample drove gamma off to infinity: skip it
            return None

    ci, kept = _bootstrap(refit, bootstrap, ci_level, seed)
    fit = PowerLawFit(**to_params(p), rmse=0.0, n_runs=n, ci=ci, n_boot=kept)
    rmse = float(np.sqrt(np.mean((np.log(fit.loss(C)) - logL) ** 2)))
    return dataclasses.replace(fit, rmse=rmse)


def compute_frontier(C: ArrayLike, L: ArrayLike) -> np.ndarray:
    """Indices, by increasing C, of runs that no cheaper-or-equal run beats on loss."""
    C, L = _positive("C", C), _positive("L", L)
    _same_length(C=C, L=L)
    order = np.lexsort((L, C))
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], L[order][:-1]]))
    return order[L[order] < best_before]


def compute_optimal(C: float | ArrayLike, fit: ChinchillaFit | IsoFlopFit) -> tuple[Any, Any]:
    """(N_opt, D_opt) for a FLOP budget C (scalar or array) under an approach 2 or 3 fit."""
    c = np.asarray(C, np.float64)
    bad = np.flatnonzero(~np.isfinite(c.ravel()) | (c.ravel() <= 0))
    if bad.size:
        raise ValueError(f"C must be finite and > 0 FLOPs; got {float(c.ravel()[bad[0]])!r}")
    if isinstance(fit, ChinchillaFit):
        # Minimise A·N^−α + B·D^−β on 6·N·D = C: setting d/dN = 0 with D = C/(6N) gives
        # α·A·N^−α = β·B·D^−β, hence N = G·(C/6)^a and D = (C/6)^b / G with
        # G = (αA / (βB))^(1/(α+β)).
        G = (fit.alpha * fit.A / (fit.beta * fit.B)) ** (1.0 / (fit.alpha + fit.beta))
        N, D = G * (c / 6.0) ** fit.a, (c / 6.0) ** fit.b / G
    elif isinstance(fit, IsoFlopFit):
        N, D = fit.k_N * c**fit.a, fit.k_D * c**fit.b
    else:
        raise TypeError(f"fit must be a ChinchillaFit or IsoFlopFit; got {type(fit).__name__}")
    if c.ndim == 0:
        return float(N), float(D)
    return N, D


@dataclasses.dataclass(frozen=True, eq=False)
class RunFits:
    """Every fit a results table allows; `skipped` says why a fit is None."""

    N: np.ndarray
    D: np.ndarray
    C: np.ndarray
    L: np.ndarray
    budget: tuple[Hashable, ...]  # None for runs outside any IsoFLOP budget
    chinchilla: ChinchillaFit | None
    isoflop: IsoFlopFit | None
    power_law: PowerLawFit | None
    skipped: dict[str, str]

    def summary(self, targets: ArrayLike | None = None) -> dict[str, Any]:
        """JSON-serialisable fits and compute-optimal (N, D, L) at `targets` FLOPs.

        `targets` defaults to 1×, 10× and 100× the largest run's FLOPs.
        """
        if targets is None:
            targets = float(self.C.max()) * np.array([1.0, 10.0, 100.0])
        targets = _positive("targets", targets)
        fits = {"chinchilla": self.chinchilla, "isoflop": self.isoflop, "power_law": self.power_law}
        recommendations = []
        for c in targets.tolist():
            row: dict[str, Any] = {"flops": c}
            for name, fit in fits.items():
                if isinstance(fit, (ChinchillaFit, IsoFlopFit)):
                    n_opt, d_opt = compute_optimal(c, fit)
                    row[name] = {"params": n_opt, "tokens": d_opt}
                    if isinstance(fit, ChinchillaFit):
                        row[name]["loss"] = float(fit.loss(n_opt, d_opt))
                elif fit is not None:
                    row[name] = {"loss": float(fit.loss(c))}
            recommendations.append(row)
        out: dict[str, Any] = {"n_runs": int(self.N.size), "skipped": dict(self.skipped)}
        out |= {name: fit.as_dict() if fit else None for name, fit in fits.items()}
        out["compute_optimal"] = recommendations
        return out


def _rows_to_columns(rows: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, ...]:
    keys = ("params", "tokens", "flops", "eval_loss")
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"row {i} lacks keys {missing}; each row needs {keys}")
    columns = [np.array([row[k] for row in rows], np.float64) for k in keys]
    return tuple(_positive(k, v) for k, v in zip(keys, columns, strict=True))


def fit_runs(rows: Sequence[Mapping[str, Any]], *, bootstrap: int = 0, seed: int = 0) -> RunFits:
    """Fit whatever the runs allow; rows have `params`, `tokens`, `flops`, `eval_loss`, `budget`.

    Approach 3 needs >= 5 runs; approach 2 uses the budgets with >= 3 model sizes and needs two of
    them; the power law in compute is fitted to `compute_frontier` and needs 4 runs on it. A fit
    that the data rules out (too few runs, a parabola opening downward) is None, with the reason
    in `skipped`.
    """
    if not rows:
        raise ValueError("rows is empty; expected one dict per training run")
    N, D, C, L = _rows_to_columns(rows)
    budget = tuple(row.get("budget") for row in rows)
    fits: dict[str, Any] = {}
    skipped: dict[str, str] = {}

    def attempt(name: str, fn: Callable[[], Any]) -> None:
        try:
            fits[name] = fn()
        except ValueError as e:
            skipped[name] = str(e)

    opts = {"bootstrap": bootstrap, "seed": seed}
    attempt("chinchilla", lambda: fit_chinchilla(N, D, L, **opts))
    sizes: dict[Hashable, set[float]] = {}
    for b, n in zip(budget, N.tolist(), strict=True):
        if b is not None:
            sizes.setdefault(b, set()).add(n)
    usable = [i for i, b in enumerate(budget) if len(sizes.get(b, ())) >= 3]
    labels = [budget[i] for i in usable]
    if len(set(labels)) >= 2:
        attempt("isoflop", lambda: fit_isoflop(N[usable], C[usable], L[usable], labels, **opts))
    else:
        counts = {b: len(v) for b, v in sizes.items()}
        skipped["isoflop"] = (
            f"approach 2 needs >= 2 FLOP budgets with >= 3 model sizes each; got sizes {counts}"
        )
    front = compute_frontier(C, L)
    attempt("power_law", lambda: fit_power_law(C[front], L[front], **opts))
    chinchilla, isoflop, power_law = (fits.get(k) for k in ("chinchilla", "isoflop", "power_law"))
    return RunFits(N, D, C, L, budget, chinchilla, isoflop, power_law, skipped)


def fit_results(
    rows: Sequence[Mapping[str, Any]],
    *,
    bootstrap: int = 0,
    seed: int = 0,
    targets: ArrayLike | None = None,
) -> dict[str, Any]:
    """`fit_runs(rows).summary(targets)`: a JSON-serialisable report of every possible fit."""
    return fit_runs(rows, bootstrap=bootstrap, seed=seed).summary(targets)
