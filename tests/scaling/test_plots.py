"""Scaling plots: the drawn points and curves against the input runs and independent formulas."""

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from jaxlm.scaling import (
    RunFits,
    fit_chinchilla,
    fit_isoflop,
    fit_power_law,
    plot_all,
    plot_coord_check,
    plot_isoflops,
    plot_loss_vs_compute,
    plot_lr_transfer,
    plot_optimal_allocation,
)

LAW = {"E": 1.8, "A": 400.0, "B": 1200.0, "alpha": 0.35, "beta": 0.30}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _law(N, D, E, A, B, alpha, beta):
    return E + A / np.asarray(N) ** alpha + B / np.asarray(D) ** beta


def _brute_force_optimum(C, law):
    """(N, L) minimising the law along D = C/(6N) over a dense log grid of N."""
    N = np.geomspace(1e3, 1e15, 200_001)
    L = _law(N, C / (6 * N), **law)
    return N[L.argmin()], L.min()


@pytest.fixture(scope="module")
def runs():
    """4 IsoFLOP budgets x 6 sizes from the law with 0.5% noise, and every fit of them."""
    rng = np.random.default_rng(0)
    N, C, budget = [], [], []
    for i, c in enumerate(np.geomspace(1e17, 1e20, 4)):
        n_opt, _ = _brute_force_optimum(c, LAW)
        N += (n_opt * np.geomspace(0.1, 10, 6)).tolist()
        C += [c] * 6
        budget += [i] * 6
    N, C = np.array(N), np.array(C)
    D = C / (6 * N)
    L = _law(N, D, **LAW) * np.exp(0.005 * rng.standard_normal(N.size))
    best = [int(np.flatnonzero(c == C)[np.argmin(L[c == C])]) for c in np.unique(C)]
    return {
        "N": N,
        "D": D,
        "C": C,
        "L": L,
        "budget": budget,
        "chinchilla": fit_chinchilla(N, D, L, n_starts=8),
        "isoflop": fit_isoflop(N, C, L, budget),
        "power_law": fit_power_law(C[best], L[best]),
    }


def _assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_loss_vs_compute(runs, tmp_path):
    path = tmp_path / "loss.png"
    fig = plot_loss_vs_compute(
        runs["C"],
        runs["L"],
        runs["N"],
        power_law=runs["power_law"],
        chinchilla=runs["chinchilla"],
        path=path,
    )
    _assert_png(path)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    (points,) = ax.collections
    np.testing.assert_array_equal(points.get_offsets(), np.column_stack([runs["C"], runs["L"]]))
    np.testing.assert_allclose(points.get_array(), np.log10(runs["N"]))
    power, frontier = ax.lines
    p = runs["power_law"]
    x = power.get_xdata()
    assert x.min() < runs["C"].min() and x.max() > runs["C"].max()
    np.testing.assert_allclose(power.get_ydata(), p.E + p.k * x**-p.gamma, rtol=1e-12)
    # The approach-3 frontier is the fitted law's minimum along 6·N·D = C.
    f = runs["chinchilla"]
    fitted = {"E": f.E, "A": f.A, "B": f.B, "alpha": f.alpha, "beta": f.beta}
    x, y = frontier.get_xdata(), frontier.get_ydata()
    for i in range(0, x.size, 50):
        assert y[i] == pytest.approx(_brute_force_optimum(x[i], fitted)[1], rel=1e-8)


def test_loss_vs_compute_without_fits_draws_only_points(runs):
    fig = plot_loss_vs_compute(runs["C"], runs["L"], runs["N"])
    assert len(fig.axes[0].lines) == 0 and len(fig.axes[0].collections) == 1
    with pytest.raises(ValueError, match=r"\(24,\), \(24,\), \(3,\)"):
        plot_loss_vs_compute(runs["C"], runs["L"], runs["N"][:3])


def test_isoflops(runs, tmp_path):
    fit = runs["isoflop"]
    fig = plot_isoflops(fit, path=tmp_path / "iso.png")
    _assert_png(tmp_path / "iso.png")
    ax = fig.axes[0]
    assert len(ax.collections) == 4 and len(ax.lines) == 2 * 4
    for i, (points, curve) in enumerate(zip(ax.collections, fit.curves, strict=True)):
        assert curve.budget == i
        mask = np.asarray(runs["budget"]) == i
        np.testing.assert_allclose(
            points.get_offsets(), np.column_stack([runs["N"], runs["L"]])[mask]
        )
        parabola, minimum = ax.lines[2 * i], ax.lines[2 * i + 1]
        # Independent parabola: numpy's least squares in log10 N on the same runs.
        c2, c1, c0 = np.polyfit(np.log10(runs["N"][mask]), runs["L"][mask], 2)
        x = parabola.get_xdata()
        np.testing.assert_allclose(parabola.get_ydata(), np.polyval([c2, c1, c0], np.log10(x)))
        vertex = -c1 / (2 * c2)
        np.testing.assert_allclose(minimum.get_xdata(), [10**vertex], rtol=1e-9)
        np.testing.assert_allclose(minimum.get_ydata(), [np.polyval([c2, c1, c0], vertex)])


def test_optimal_allocation(runs, tmp_path):
    iso, chin = runs["isoflop"], runs["chinchilla"]
    fig = plot_optimal_allocation(isoflop=iso, chinchilla=chin, path=tmp_path / "alloc.png")
    _assert_png(tmp_path / "alloc.png")
    ax_n, ax_d = fig.axes
    C = np.unique(runs["C"])
    np.testing.assert_allclose(ax_n.collections[0].get_offsets()[:, 0], C)
    np.testing.assert_allclose(
        ax_n.collections[0].get_offsets()[:, 1] * ax_d.collections[0].get_offsets()[:, 1] * 6, C
    )
    fitted = {"E": chin.E, "A": chin.A, "B": chin.B, "alpha": chin.alpha, "beta": chin.beta}
    for ax, slope, from_n in ((ax_n, iso.a, lambda c, n: n), (ax_d, iso.b, lambda c, n: c / 6 / n)):
        iso_line, chin_line = ax.lines
        x, y = iso_line.get_xdata(), iso_line.get_ydata()
        assert np.log(y[-1] / y[0]) / np.log(x[-1] / x[0]) == pytest.approx(slope)
        x, y = chin_line.get_xdata(), chin_line.get_ydata()
        for i in (0, 100, 199):
            n_ref, _ = _brute_force_optimum(x[i], fitted)
            assert y[i] == pytest.approx(from_n(x[i], n_ref), rel=1e-3)


def test_optimal_allocation_needs_a_fit():
    with pytest.raises(ValueError, match="needs an isoflop fit"):
        plot_optimal_allocation()


def test_plot_all(runs, tmp_path):
    columns = [
        runs[k] for k in ("N", "D", "C", "L", "budget", "chinchilla", "isoflop", "power_law")
    ]
    written = plot_all(RunFits(*columns, skipped={}), tmp_path / "plots")
    names = ["loss_vs_compute.png", "isoflops.png", "optimal_allocation.png"]
    assert [p.name for p in written] == names
    for path in written:
        _assert_png(path)


def test_lr_transfer_draws_each_width_and_marks_its_best_rate(tmp_path):
    rows = [
        {"parametrization": p, "d_model": w, "learning_rate": lr, "eval_loss": loss}
        for p, w, lr, loss in [
            ("mup", 16, 1e-3, 3.1), ("mup", 16, 4e-3, 2.6), ("mup", 32, 4e-3, 2.2),
            ("mup", 32, 1e-3, 2.9), ("sp", 16, 1e-3, 3.0), ("sp", 16, 4e-3, 2.5),
            ("sp", 32, 1e-3, 2.4), ("sp", 32, 4e-3, float("inf")),
        ]
    ]  # fmt: skip
    fig = plot_lr_transfer(rows, path=tmp_path / "lr.png")
    _assert_png(tmp_path / "lr.png")
    mup_ax, sp_ax = fig.axes[:2]
    assert mup_ax.get_title() == "muP" and sp_ax.get_xscale() == "log"
    curve16, star16, curve32, star32 = mup_ax.lines
    np.testing.assert_array_equal(curve16.get_xdata(), [1e-3, 4e-3])  # sorted by rate
    np.testing.assert_array_equal(curve32.get_ydata(), [2.9, 2.2])
    assert (star16.get_xdata()[0], star16.get_ydata()[0]) == (4e-3, 2.6)
    assert (star32.get_xdata()[0], star32.get_ydata()[0]) == (4e-3, 2.2)
    sp_star32 = sp_ax.lines[3]  # the diverged run is drawn but never the best
    assert (sp_star32.get_xdata()[0], sp_star32.get_ydata()[0]) == (1e-3, 2.4)
    with pytest.raises(ValueError, match="parametrization column"):
        plot_lr_transfer([])


def test_coord_check_plots_each_layer_against_width(tmp_path):
    rows = [
        {"width": w, "step": s, "layer": layer, "size": 1.0 + s, "update": s * w / 16 * k}
        for w in (16, 32, 64)
        for s in (0, 2)
        for layer, k in (("embed", 1.0), ("logits", 3.0))
    ]
    fig = plot_coord_check({"sp": rows, "mup": rows[:6]}, path=tmp_path / "cc.png")
    _assert_png(tmp_path / "cc.png")
    sp_ax, mup_ax = fig.axes[:2]
    assert sp_ax.get_title() == "standard parametrization" and sp_ax.get_xscale() == "log"
    embed, logits = sp_ax.lines
    np.testing.assert_array_equal(logits.get_xdata(), [16, 32, 64])
    np.testing.assert_array_equal(logits.get_ydata(), [6.0, 12.0, 24.0])  # step 2, the last
    assert embed.get_label() == "embed" and len(mup_ax.lines) == 2
    with pytest.raises(ValueError, match="coord_check rows"):
        plot_coord_check({})
