"""Scaling-law plots: loss against compute, IsoFLOP curves, and compute-optimal N and D against C.

Each function returns a `matplotlib.figure.Figure` built directly (no pyplot, so no global state
and no GUI backend) and saves a PNG when given a `path`. matplotlib is imported only when a plot is
made, so the fits work without it.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxlm.scaling.fits import (
    ArrayLike,
    ChinchillaFit,
    IsoFlopFit,
    PowerLawFit,
    RunFits,
    compute_optimal,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PathLike = str | os.PathLike


def _figure(ncols: int = 1) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5 * ncols, 4.2), layout="constrained")
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _save(fig: Figure, path: PathLike | None) -> Figure:
    if path is not None:
        # A bare Figure has no pyplot canvas; savefig falls back to Agg for PNG.
        fig.savefig(os.fspath(path), dpi=120)
    return fig


def _compute_grid(lo: float, hi: float) -> np.ndarray:
    # A decade past the largest run: the frontier is mostly read as an extrapolation.
    return np.geomspace(lo / 2, hi * 10, 200)


def plot_loss_vs_compute(
    C: ArrayLike,
    L: ArrayLike,
    N: ArrayLike,
    *,
    power_law: PowerLawFit | None = None,
    chinchilla: ChinchillaFit | None = None,
    path: PathLike | None = None,
) -> Figure:
    """Runs' loss against FLOPs coloured by model size, with the fitted compute frontiers."""
    C, L, N = (np.asarray(v, np.float64) for v in (C, L, N))
    if not C.shape == L.shape == N.shape:
        raise ValueError(f"C, L, N must have one shape; got {C.shape}, {L.shape}, {N.shape}")
    fig, (ax,) = _figure()
    points = ax.scatter(C, L, c=np.log10(N), cmap="viridis", s=18, zorder=3)
    fig.colorbar(points, ax=ax, label="log10 parameters")
    grid = _compute_grid(C.min(), C.max())
    if power_law is not None:
        p = power_law
        label = f"L = {p.E:.3g} + {p.k:.3g}·C^-{p.gamma:.3g}"
        ax.plot(grid, p.loss(grid), color="black", label=label)
    if chinchilla is not None:
        N_opt, D_opt = compute_optimal(grid, chinchilla)
        label = f"approach 3 frontier (a={chinchilla.a:.2f}, b={chinchilla.b:.2f})"
        ax.plot(grid, chinchilla.loss(N_opt, D_opt), color="tab:red", ls="--", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs C")
    ax.set_ylabel("eval loss")
    ax.set_title("Loss against compute")
    if ax.lines:
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_isoflops(fit: IsoFlopFit, *, path: PathLike | None = None) -> Figure:
    """Loss against N for each FLOP budget with its parabola and the parabola's minimum."""
    from matplotlib import colormaps

    fig, (ax,) = _figure()
    cmap = colormaps["plasma"]
    for i, curve in enumerate(fit.curves):
        # Budgets ordered by C get colours from dark (small) to light (large).
        color = cmap(0.85 * i / max(len(fit.curves) - 1, 1))
        N = np.asarray(curve.N)
        ax.scatter(N, curve.L, color=color, s=18, zorder=3)
        span = np.geomspace(N.min() / 1.25, N.max() * 1.25, 100)
        ax.plot(span, curve.loss(span), color=color, label=f"C = {curve.C:.2g}")
        ax.plot([curve.N_opt], [curve.L_opt], marker="*", ms=12, ls="", color=color, mec="black")
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("eval loss")
    ax.set_title(f"IsoFLOP curves (N_opt ∝ C^{fit.a:.2f})")
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_optimal_allocation(
    *,
    isoflop: IsoFlopFit | None = None,
    chinchilla: ChinchillaFit | None = None,
    C_range: tuple[float, float] | None = None,
    path: PathLike | None = None,
) -> Figure:
    """N_opt (left) and D_opt (right) against C: approach 2 minima and both fitted power laws."""
    if isoflop is None and chinchilla is None:
        raise ValueError("plot_optimal_allocation needs an isoflop fit, a chinchilla fit or both")
    if C_range is None:
        if isoflop is None:
            raise ValueError("C_range=(lo, hi) FLOPs is needed when there is no isoflop fit")
        C_range = (isoflop.curves[0].C, isoflop.curves[-1].C)
    lo, hi = C_range
    if not 0 < lo < hi:
        raise ValueError(f"C_range must satisfy 0 < lo < hi; got {C_range}")
    grid = _compute_grid(lo, hi)
    fig, (ax_n, ax_d) = _figure(ncols=2)
    if isoflop is not None:
        C = [c.C for c in isoflop.curves]
        ax_n.scatter(C, [c.N_opt for c in isoflop.curves], color="tab:blue", zorder=3)
        ax_d.scatter(C, [c.D_opt for c in isoflop.curves], color="tab:blue", zorder=3)
        N_opt, D_opt = compute_optimal(grid, isoflop)
        ax_n.plot(grid, N_opt, color="tab:blue", label=f"approach 2: C^{isoflop.a:.3f}")
        ax_d.plot(grid, D_opt, color="tab:blue", label=f"approach 2: C^{isoflop.b:.3f}")
    if chinchilla is not None:
        N_opt, D_opt = compute_optimal(grid, chinchilla)
        ax_n.plot(grid, N_opt, color="tab:red", ls="--", label=f"approach 3: C^{chinchilla.a:.3f}")
        ax_d.plot(grid, D_opt, color="tab:red", ls="--", label=f"approach 3: C^{chinchilla.b:.3f}")
    for ax, name in ((ax_n, "parameters N_opt"), (ax_d, "tokens D_opt")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training FLOPs C")
        ax.set_ylabel(name)
        ax.legend(fontsize="small")
    return _save(fig, path)


def plot_all(fits: RunFits, out_dir: PathLike) -> list[pathlib.Path]:
    """Every plot the fits allow, as PNGs in `out_dir`; returns the paths written."""
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "loss_vs_compute.png"]
    plot_loss_vs_compute(
        fits.C,
        fits.L,
        fits.N,
        power_law=fits.power_law,
        chinchilla=fits.chinchilla,
        path=written[0],
    )
    if fits.isoflop is not None:
        written.append(out / "isoflops.png")
        plot_isoflops(fits.isoflop, path=written[-1])
    if fits.isoflop is not None or fits.chinchilla is not None:
        written.append(out / "optimal_allocation.png")
        C_range = (float(fits.C.min()), float(fits.C.max()))
        plot_optimal_allocation(
            isoflop=fits.isoflop, chinchilla=fits.chinchilla, C_range=C_range, path=written[-1]
        )
    return written


def plot_lr_transfer(rows: Sequence[Mapping[str, Any]], *, path: PathLike | None = None) -> Figure:
    """Eval loss against learning rate, one line per width and one panel per parametrization
    (rows of an `lr_grid` sweep), each width's best learning rate marked: under muP the minima
    line up, under SP they move with the width."""
    from jaxlm.scaling.sweep import best_learning_rates

    groups = sorted({str(r["parametrization"]) for r in rows})
    if not groups:
        raise ValueError("plot_lr_transfer needs rows with a parametrization column")
    best = best_learning_rates(rows)
    fig, axes = _figure(len(groups))
    widths = sorted({int(r["d_model"]) for r in rows})
    from matplotlib import colormaps

    colours = [colormaps["viridis"](0.85 * i / max(len(widths) - 1, 1)) for i in range(len(widths))]
    finite = [
        r["eval_loss"] for r in rows if r["eval_loss"] is not None and np.isfinite(r["eval_loss"])
    ]
    for ax, p in zip(axes, groups, strict=True):
        for width, colour in zip(widths, colours, strict=True):
            mine = sorted(
                (r["learning_rate"], r["eval_loss"])
                for r in rows
                if str(r["parametrization"]) == p and int(r["d_model"]) == width
            )
            if not mine:
                continue
            lr, loss = np.array(mine, dtype=float).T
            ax.plot(lr, loss, "o-", color=colour, label=f"d_model {width}")
            if width in best.get(p, {}):
                b = best[p][width]
                ax.plot(b["learning_rate"], b["eval_loss"], "*", color=colour, markersize=14)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("eval loss")
        ax.set_title({"sp": "standard parametrization", "mup": "muP"}.get(p, p))
        if finite:  # diverged runs would stretch the axis to uselessness
            lo, hi = min(finite), np.percentile(finite, 90)
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.1 * (hi - lo))
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_coord_check(
    rows: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    key: str = "update",
    step: int | None = None,
    path: PathLike | None = None,
) -> Figure:
    """The coordinate check: `key` ("update" or "size") of each layer against width at `step`
    (default: the last), one panel per entry of `rows` (e.g. {"sp": coord_check(...), "mup":
    coord_check(...)}), both axes logarithmic: flat lines under muP, rising ones under SP."""
    if not rows:
        raise ValueError("plot_coord_check needs {name: coord_check rows}")
    fig, axes = _figure(len(rows))
    for ax, (name, table) in zip(axes, rows.items(), strict=True):
        last = max(r["step"] for r in table) if step is None else step
        at = [r for r in table if r["step"] == last]
        layers = list(dict.fromkeys(r["layer"] for r in at))
        for layer in layers:
            points = sorted((r["width"], r[key]) for r in at if r["layer"] == layer)
            width, value = np.array(points, dtype=float).T
            ax.plot(width, value, "o-", label=layer)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("width (d_model)")
        ax.set_ylabel(f"mean |{'x_t - x_0' if key == 'update' else 'x_t'}| at step {last}")
        ax.set_title({"sp": "standard parametrization", "mup": "muP"}.get(name, name))
        ax.legend(fontsize=8)
    return _save(fig, path)
