"""The report of a reproduction: tables, figures, the paper's claims checked against the runs.

Reads ``OUT/results.json`` and the curve files, writes ``OUT/report.md`` and PNG figures into
``OUT``, and prints a summary (the language-model task's part is ``lm_report``'s). Claims are
judged from the numbers, never asserted: a claim that the runs do not show is reported as not
shown.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from adampx.experiments import toys

__all__ = ["PAPER_IMAGENET", "summarize_classification", "write_report"]

# ImageNet top-1 (%) as the paper reports it (Heo et al., ICLR 2021): (baseline, projected).
PAPER_IMAGENET = {
    ("ResNet18", "SGD → SGDP"): (70.28, 70.73),
    ("ResNet18", "Adam → AdamP"): (70.41, 70.81),
    ("ResNet50", "SGD → SGDP"): (76.64, 76.71),
    ("ResNet50", "Adam → AdamP"): (76.65, 76.94),
    ("MobileNetV2", "SGD → SGDP"): (71.61, 72.18),
    ("MobileNetV2", "Adam → AdamP"): (72.12, 72.57),
    ("ResNet18, no weight decay", "SGD → SGDP"): (67.94, 70.21),
    ("ResNet18, no weight decay", "Adam → AdamP"): (68.52, 70.50),
}
PAIRS = (("SGD", "SGDP"), ("AdamW", "AdamP"), ("Adam", "AdamP"))


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _t95(n: int) -> float:
    """Two-sided 95 % Student-t quantile with ``n − 1`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, n - 1))


def summarize_classification(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (optimizer, weight decay on/off): accuracy and norm statistics over seeds."""
    groups: dict[tuple[str, bool], list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if r["task"] == "classification":
            groups[(r["optimizer"], r["weight_decay"] > 0)].append(r)
    rows = []
    for (opt, wd_on), rs in groups.items():
        acc = [100 * r["test_accuracy"] for r in rs]
        growth = [r["norm_end"] / r["norm_start"] for r in rs]
        n = len(acc)
        std = statistics.stdev(acc) if n > 1 else float("nan")
        rows.append(
            {
                "optimizer": opt,
                "weight_decay_on": wd_on,
                "weight_decay": rs[0]["weight_decay"],
                "n": n,
                "acc_mean": statistics.fmean(acc),
                "acc_std": std,
                "acc_ci95": _t95(n) * std / math.sqrt(n) if n > 1 else float("nan"),
                "norm_start": statistics.fmean(r["norm_start"] for r in rs),
                "norm_end": statistics.fmean(r["norm_end"] for r in rs),
                "growth": statistics.fmean(growth),
                # effective step size lr/‖w‖² at the end relative to the start (same lr)
                "eff_step_ratio": statistics.fmean(1 / g**2 for g in growth),
            }
        )
    order = {name: i for i, name in enumerate(("SGD", "SGDP", "Adam", "AdamW", "AdamP"))}
    rows.sort(key=lambda r: (not r["weight_decay_on"], order.get(r["optimizer"], 99)))
    return rows


def _row(rows: list[dict[str, Any]], opt: str, wd_on: bool) -> dict[str, Any] | None:
    if opt == "AdamW" and not wd_on:
        opt = "Adam"  # without weight decay AdamW is Adam
    return next((r for r in rows if r["optimizer"] == opt and r["weight_decay_on"] == wd_on), None)


def _claims(rows: list[dict[str, Any]]) -> list[str]:
    """The paper's claims, each judged from the rows."""
    lines = []
    for base, proj in PAIRS:
        for wd_on in (True, False):
            b, p = _row(rows, base, wd_on), _row(rows, proj, wd_on)
            if b is None or p is None or (base == "AdamW" and not wd_on):
                continue
            wd = "with" if wd_on else "without"
            kept = p["growth"] < b["growth"]
            lines.append(
                f"- Norm growth, {proj} vs {base} {wd} weight decay: ×{p['growth']:.3f} vs "
                f"×{b['growth']:.3f} — **{'shown' if kept else 'not shown'}** "
                f"({proj} {'keeps' if kept else 'does not keep'} the scale-invariant norm lower)."
            )
            diff = p["acc_mean"] - b["acc_mean"]
            ci = math.hypot(p["acc_ci95"], b["acc_ci95"])
            if math.isnan(ci):
                verdict = "not resolvable with one seed"
            elif diff > ci:
                verdict = "projected more accurate, beyond the 95 % intervals"
            elif diff < -ci:
                verdict = "projected LESS accurate, beyond the 95 % intervals"
            else:
                verdict = "no difference resolvable with these seeds"
            lines.append(
                f"- Accuracy, {proj} vs {base} {wd} weight decay: {p['acc_mean']:.2f} % vs "
                f"{b['acc_mean']:.2f} % (difference {diff:+.2f} ± {ci:.2f}) — {verdict}."
            )
    for base, proj in (("SGD", "SGDP"), ("Adam", "AdamP")):
        b_on, b_off = _row(rows, base, True), _row(rows, base, False)
        p_on, p_off = _row(rows, proj, True), _row(rows, proj, False)
        if b_on is None or b_off is None or p_on is None or p_off is None:
            continue
        b_loss = b_on["acc_mean"] - b_off["acc_mean"]
        p_loss = p_on["acc_mean"] - p_off["acc_mean"]
        ci = math.hypot(
            math.hypot(p_on["acc_ci95"], p_off["acc_ci95"]),
            math.hypot(b_on["acc_ci95"], b_off["acc_ci95"]),
        )
        if math.isnan(ci):
            verdict = "not resolvable with one seed"
        elif b_loss - p_loss > ci:
            verdict = f"**shown**: {proj} loses less, beyond the 95 % intervals"
        elif p_loss - b_loss > ci:
            verdict = f"**not shown**: {proj} loses more, beyond the 95 % intervals"
        else:
            verdict = "no difference resolvable with these seeds"
        paper = PAPER_IMAGENET[("ResNet18", f"{base} → {proj}")]
        paper_off = PAPER_IMAGENET[("ResNet18, no weight decay", f"{base} → {proj}")]
        lines.append(
            f"- Accuracy lost by turning weight decay off (on − off): {proj} {p_loss:+.2f} "
            f"points, {base} {b_loss:+.2f} points (paper, ImageNet ResNet-18: {proj} "
            f"{paper[1] - paper_off[1]:.2f}, {base} {paper[0] - paper_off[0]:.2f}) — {verdict}."
        )
    return lines


def _load_curve(out: Path, run: dict[str, Any]) -> Any:
    path = out / run["curve"]
    return json.loads(path.read_text()) if path.exists() else None


def _toy2d(out: Path, runs: list[dict[str, Any]]) -> list[str]:
    runs = [r for r in runs if r["task"] == "toy2d"]
    if not runs:
        return []
    plt = _pyplot()
    fig, (ax_n, ax_e) = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        curve = _load_curve(out, r)
        if curve:
            style = "-" if "projection" in r["optimizer"] else "--"
            ax_n.plot(curve["norms"], style, label=r["optimizer"])
            ax_e.plot([max(e, 1e-6) for e in curve["errors"]], style, label=r["optimizer"])
    ax_n.set(xlabel="step", ylabel="‖w‖", yscale="log", title="2-D toy: weight norm")
    ax_e.set(xlabel="step", ylabel="angle to w* (degrees)", yscale="log", title="angle error")
    ax_n.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "toy2d.png", dpi=110)
    plt.close(fig)
    lines = [
        "## 2-D toy",
        "",
        f"Minimise `−⟨w/‖w‖, w*⟩` from `w0 = (1, 0)` to `w*` at {toys.TOY2D_TARGET_DEG:g}°, "
        f"{toys.TOY2D_STEPS} steps, lr {toys.TOY2D_LR} (the paper gives none; stated here). "
        "Paper: momentum GD inflates `‖w‖` (2.93 at momentum 0.9, 27.87 at 0.99 in its run) "
        "and converges slowly; with the projection `‖w‖` stays near 1.",
        "",
        "| method | final ‖w‖ | final angle to w* (°) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {r['optimizer']} | {r['norm_end']:.3f} | {r['final_error']:.3g} |" for r in runs]
    return [*lines, "", "![2-D toy](toy2d.png)", ""]


def _best_toy3d(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per 3-D toy method, its run with the lowest final Rosenbrock value."""
    best: dict[str, dict[str, Any]] = {}
    for r in runs:
        if r["task"] != "toy3d":
            continue
        m = r["optimizer"]
        if m not in best or r["final_error"] < best[m]["final_error"]:
            best[m] = r
    return best


def _toy3d(out: Path, runs: list[dict[str, Any]]) -> list[str]:
    runs = [r for r in runs if r["task"] == "toy3d"]
    if not runs:
        return []
    best = _best_toy3d(runs)
    plt = _pyplot()
    import numpy as np

    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(11, 4.5))
    a, b = np.meshgrid(np.linspace(-2.5, 2.0, 200), np.linspace(-0.5, 3.0, 200))
    ax_t.contour(a, b, np.log1p((1 - a) ** 2 + 100 * (b - a * a) ** 2), levels=20, alpha=0.4)
    ax_t.plot(*toys.TOY3D_OPTIMUM, "k*", markersize=12)
    for m, r in best.items():
        curve = _load_curve(out, r)
        if curve:
            path = np.array(curve["path"])
            ax_t.plot(path[:, 0], path[:, 1], label=f"{m} (lr {r['lr']:g})")
            ax_r.plot(curve["norms"], label=m)
    ax_t.set(xlabel="azimuth a", ylabel="polar angle b", title="3-D toy: paths on the angles")
    ax_r.set(xlabel="iteration", ylabel="radius ‖w‖", title="radius")
    ax_t.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "toy3d.png", dpi=110)
    plt.close(fig)
    lrs = ", ".join(f"{lr:g}" for lr in toys.TOY3D_LRS)
    lines = [
        "## 3-D toy",
        "",
        "Rosenbrock `f(a, b) = (1 − a)² + 100 (b − a²)²` of the angles of "
        "`w = r (sin b cos a, sin b sin a, cos b)`, from `(a, b) = (−2, 2)`, `r = 1`, to the "
        f"optimum (1, 1); {toys.TOY3D_STEPS} iterations, momentum {toys.TOY3D_MOMENTUM}, "
        f"weight decay λ = 1 where used (wd_ratio 1). Each method's best learning rate "
        f"from {{{lrs}}} (lowest final f). Paper: momentum GD's radius rises (to about 3.2) "
        "and it stalls; with the projection the radius stays near 1 and it converges.",
        "",
        "| method | best lr | final f | final radius |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {m} | {r['lr']:g} | {r['final_error']:.4g} | {r['norm_end']:.3f} |"
        for m, r in best.items()
    ]
    return [*lines, "", "![3-D toy](toy3d.png)", ""]


def _classification(out: Path, runs: list[dict[str, Any]]) -> list[str]:
    runs = [r for r in runs if r["task"] == "classification"]
    if not runs:
        return []
    rows = summarize_classification(runs)
    _classification_figures(out, runs, rows)
    r0 = runs[0]
    lines = [
        f"## Classification: {r0['dataset']}, {r0['model']}",
        "",
        f"{r0['epochs']} epochs, seeds {sorted({r['seed'] for r in runs})}; optimizer "
        "settings in `adampx.experiments.classification`. ‖w‖ is the norm of all weights "
        "that `adampx.inspect` finds scale invariant (the convs in front of BatchNorm).",
        "",
        "### The mechanism: weight norms and effective step sizes",
        "",
        "| optimizer | weight decay | ‖w‖ start | ‖w‖ end | growth | lr/‖w‖² end ÷ start |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['optimizer']} | {r['weight_decay']:g} | {r['norm_start']:.2f} | "
        f"{r['norm_end']:.2f} | ×{r['growth']:.3f} | {r['eff_step_ratio']:.3f} |"
        for r in rows
    ]
    lines += [
        "",
        "![norm curves](classification_norms.png)",
        "",
        "Per layer (one seed, with weight decay), and how many of the tested tensors "
        "AdamP and SGDP projected at the logged steps:",
        "",
        "![per-layer norm growth](classification_layers.png)",
        "",
        "![fraction projected](classification_projected.png)",
        "",
        "### Test accuracy",
        "",
        "| optimizer | weight decay | seeds | mean (%) | std | 95 % CI ± |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['optimizer']} | {r['weight_decay']:g} | {r['n']} | {r['acc_mean']:.2f} | "
        f"{r['acc_std']:.2f} | {r['acc_ci95']:.2f} |"
        for r in rows
    ]
    lines += [
        "",
        "![accuracy](classification_accuracy.png)",
        "",
        "### The paper's claims, checked",
        "",
        *_claims(rows),
        "",
        "The paper's accuracy gains are a few tenths of a point on ImageNet; a few seeds on a "
        "small data set cannot resolve differences of that size, so the accuracy lines above "
        "say whether a difference is resolvable rather than claim one.",
        "",
    ]
    return lines


def _classification_figures(
    out: Path, runs: list[dict[str, Any]], rows: list[dict[str, Any]]
) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for col, wd_on in enumerate((True, False)):
        curves: dict[str, list[list[dict[str, float]]]] = defaultdict(list)
        for r in runs:
            if (r["weight_decay"] > 0) == wd_on:
                c = _load_curve(out, r)
                if c and c["curve"]:
                    curves[r["optimizer"]].append(c["curve"])
        for opt, cs in curves.items():
            n = min(len(c) for c in cs)
            steps = [cs[0][i]["step"] for i in range(n)]
            style = "-" if opt.endswith("P") else "--"
            norms = [statistics.fmean(c[i]["norm"] for c in cs) for i in range(n)]
            # lr/‖w‖² at a fixed lr, relative to the start: what the norm alone does to the
            # effective step size (the lr schedule is the same for every optimizer)
            axes[0][col].plot(steps, norms, style, label=opt)
            axes[1][col].plot(steps, [(norms[0] / v) ** 2 for v in norms], style, label=opt)
        wd = "with" if wd_on else "without"
        axes[0][col].set(title=f"{wd} weight decay", ylabel="‖w‖ (scale-invariant weights)")
        axes[1][col].set(xlabel="step", ylabel="(‖w₀‖/‖w‖)²: lr/‖w‖² at fixed lr vs start")
        axes[0][col].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "classification_norms.png", dpi=110)
    plt.close(fig)

    _per_layer_figures(out, runs)

    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['optimizer']}\n{'wd' if r['weight_decay_on'] else 'no wd'}" for r in rows]
    errors = [0 if math.isnan(r["acc_ci95"]) else r["acc_ci95"] for r in rows]
    ax.bar(range(len(rows)), [r["acc_mean"] for r in rows], yerr=errors, capsize=4)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(labels, fontsize=8)
    low = min(r["acc_mean"] - e for r, e in zip(rows, errors, strict=True))
    ax.set_ylim(max(0.0, low - 2), 100)
    ax.set_ylabel("test accuracy (%), mean ± 95 % CI")
    fig.tight_layout()
    fig.savefig(out / "classification_accuracy.png", dpi=110)
    plt.close(fig)


def _per_layer_figures(out: Path, runs: list[dict[str, Any]]) -> None:
    """Per-layer norm growth and the fraction projected, through ``adampx.tools.plots``.

    One run per optimizer: weight decay on, the lowest seed.
    """
    from adampx.tools.monitor import NormRecord
    from adampx.tools.plots import plot_norm_growth, plot_projection_fraction

    chosen: dict[str, dict[str, Any]] = {}
    for r in sorted(runs, key=lambda r: r["seed"]):
        if r["weight_decay"] > 0:
            chosen.setdefault(r["optimizer"], r)
    layers, views = {}, {}
    for opt, r in chosen.items():
        c = _load_curve(out, r)
        if not c:
            continue
        layers[opt] = [NormRecord(**rec) for rec in c["layers"]]
        if c["views"]:
            views[opt] = [SimpleNamespace(step=s, view=v) for s, v in c["views"]]
    seed = "weight decay on, one seed"
    if layers:
        title = f"norm growth of each scale-invariant weight ({seed})"
        plot_norm_growth(layers, out / "classification_layers.png", title=title)
    if views:
        title = f"tensors projected among those tested ({seed})"
        plot_projection_fraction(views, out / "classification_projected.png", title=title)


def _paper_table() -> list[str]:
    lines = [
        "## The paper's ImageNet numbers, for reference",
        "",
        "| model | optimizers | baseline top-1 | projected top-1 |",
        "|---|---|---:|---:|",
    ]
    lines += [f"| {m} | {o} | {b:.2f} | {p:.2f} |" for (m, o), (b, p) in PAPER_IMAGENET.items()]
    return [*lines, ""]


def write_report(out: Path, results: dict[str, Any]) -> Path:
    """Write ``out/report.md`` and its figures; print a summary; return the report's path."""
    from adampx.experiments.lm_report import lm_section

    runs = results["runs"]
    body = [
        "# adampx reproduction report",
        "",
        f"{len(runs)} runs; settings: `{json.dumps(results['settings'])}`. "
        "Raw numbers: `results.json`; per-run curves: `curves/`.",
        "",
        *_toy2d(out, runs),
        *_toy3d(out, runs),
        *_classification(out, runs),
        *lm_section(out, runs),
        *_failed(results.get("failed", [])),
        *_paper_table(),
    ]
    path = out / "report.md"
    path.write_text("\n".join(body))
    _print_summary(runs)
    print(f"\nreport: {path}")
    return path


def _failed(failed: list[dict[str, Any]]) -> list[str]:
    if not failed:
        return []
    lines = [
        "## Failed runs",
        "",
        f"{len(failed)} runs failed; `--resume` retries them. The last line of each error "
        "(the whole traceback is in `results.json`):",
        "",
    ]
    for f in failed:
        last = f["error"].strip().splitlines()[-1] if f["error"].strip() else "no message"
        lines.append(f"- `{f['run_id']}`: {last}")
    return [*lines, ""]


def _print_summary(runs: list[dict[str, Any]]) -> None:
    toy2d = [r for r in runs if r["task"] == "toy2d"]
    if toy2d:
        print("\n2-D toy: final ‖w‖ and angle to the optimum")
        for r in toy2d:
            print(f"  {r['optimizer']:<32} ‖w‖ {r['norm_end']:8.3f}   {r['final_error']:8.3g}°")
    best3d = _best_toy3d(runs)
    if best3d:
        print("\n3-D toy (each method at its best lr): final f and radius")
    for method, r in best3d.items():
        print(f"  {method:<42} lr {r['lr']:<7g} f {r['final_error']:9.4g}  r {r['norm_end']:7.3f}")
    rows = summarize_classification(runs)
    if rows:
        print("\nclassification: norm of the scale-invariant weights and test accuracy")
        print(f"  {'optimizer':<8}{'wd':>8}{'‖w‖ growth':>12}{'acc %':>9}{'± 95% CI':>10}{'n':>4}")
        for r in rows:
            print(
                f"  {r['optimizer']:<8}{r['weight_decay']:>8g}{r['growth']:>11.3f}×"
                f"{r['acc_mean']:>9.2f}{r['acc_ci95']:>10.2f}{r['n']:>4}"
            )
        print()
        for line in _claims(rows):
            print(line.replace("**", ""))
    from adampx.experiments.lm_report import print_lm_summary

    print_lm_summary(runs)
