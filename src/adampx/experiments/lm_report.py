"""The language-model task's part of the report: perplexities, the claim, where AdamP projects.

The claim is judged by non-inferiority with the margin fixed in
:data:`adampx.experiments.lm.NON_INFERIORITY_MARGIN`: per seed (the same initial weights and
batches for both optimizers) the log of AdamP's held-out perplexity over AdamW's; the 95 %
Student-t interval of their mean, taken back to a ratio of perplexities. AdamP is shown no
worse when the interval's upper end lies below ``1 + margin``, shown worse when its lower end
lies above, and the question stays open when the interval straddles the margin.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from adampx.experiments import lm
from adampx.experiments.report import _load_curve, _pyplot, _t95

__all__ = ["PAPER_LM", "lm_claim", "lm_section", "print_lm_summary", "projection_firing"]

#: WikiText-103 test perplexity of Transformer-XL as the paper reports it.
PAPER_LM = {"AdamW": 23.33, "AdamP": 23.26}
PROJECTED = ("channel", "layer")


def _mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Mean, sample standard deviation and 95 % t half-width (NaN below two values)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, float("nan"), float("nan")
    std = statistics.stdev(values)
    return mean, std, _t95(n) * std / math.sqrt(n)


def _by_optimizer(runs: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    groups: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in runs:
        if r["task"] == "lm":
            groups[r["optimizer"]][r["seed"]] = r
    return dict(groups)


def summarize_lm(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per optimizer: held-out perplexity over seeds, final training loss, growth of
    the tested weights' norm."""
    rows = []
    for opt, by_seed in sorted(_by_optimizer(runs).items()):
        mean, std, ci = _mean_ci([r["test_perplexity"] for r in by_seed.values()])
        rows.append(
            {
                "optimizer": opt,
                "n": len(by_seed),
                "seeds": sorted(by_seed),
                "ppl_mean": mean,
                "ppl_std": std,
                "ppl_ci95": ci,
                "train_loss": statistics.fmean(r["train_loss"] for r in by_seed.values()),
                "growth": statistics.fmean(
                    r["norm_end"] / r["norm_start"] for r in by_seed.values()
                ),
            }
        )
    return rows


def lm_claim(
    runs: list[dict[str, Any]], margin: float = lm.NON_INFERIORITY_MARGIN
) -> dict[str, Any] | None:
    """AdamP's held-out perplexity over AdamW's, paired by seed, and the verdict.

    Returns ``None`` without a seed that both optimizers ran; else ``n``, ``ratio`` (the
    geometric mean of the per-seed ratios), ``low`` and ``high`` (its 95 % interval, NaN
    with one seed), ``margin`` and ``verdict`` (a sentence, the outcome in bold).
    """
    groups = _by_optimizer(runs)
    adamw, adamp = groups.get("AdamW", {}), groups.get("AdamP", {})
    seeds = sorted(set(adamw) & set(adamp))
    if not seeds:
        return None
    logs = [math.log(adamp[s]["test_perplexity"] / adamw[s]["test_perplexity"]) for s in seeds]
    mean, _, half = _mean_ci(logs)
    low, high = math.exp(mean - half), math.exp(mean + half)
    bound = 1 + margin
    if len(seeds) < 2:
        verdict = "not resolvable with one seed"
    elif high < bound:
        verdict = (
            f"**shown**: AdamP is no worse than AdamW beyond the margin (the interval's upper "
            f"end {high:.4f} < {bound:g})"
        )
        if high < 1:
            verdict += "; AdamP is better, beyond the interval"
    elif low > bound:
        verdict = (
            f"**not shown**: AdamP is worse than AdamW by more than the margin (the "
            f"interval's lower end {low:.4f} > {bound:g})"
        )
    else:
        verdict = (
            f"**not resolved**: the interval {low:.4f}–{high:.4f} straddles the margin "
            f"{bound:g}; more seeds would narrow it"
        )
    return {
        "n": len(seeds),
        "seeds": seeds,
        "ratio": math.exp(mean),
        "low": low,
        "high": high,
        "margin": margin,
        "verdict": verdict,
    }


def projection_firing(curves: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per weight AdamP tested, pooled over the runs' logged steps: how often each view fired.

    Each row: ``name``, ``tested`` (logged steps at which it was tested), ``channel`` and
    ``layer`` (steps the channel or the layer view projected it), ``fraction`` (projected /
    tested). In the order the weights first appear.
    """
    counts: dict[str, list[int]] = {}
    for curve in curves:
        for _, name, view in curve["views"]:
            if view == "skipped":
                continue
            row = counts.setdefault(name, [0, 0, 0])
            row[0] += 1
            if view in PROJECTED:
                row[1 + PROJECTED.index(view)] += 1
    return [
        {"name": n, "tested": t, "channel": c, "layer": la, "fraction": (c + la) / t}
        for n, (t, c, la) in counts.items()
    ]


def lm_section(out: Path, runs: list[dict[str, Any]]) -> list[str]:
    """The report's language-model section (and its figures in ``out``); empty without runs."""
    runs = [r for r in runs if r["task"] == "lm"]
    if not runs:
        return []
    rows = summarize_lm(runs)
    claim = lm_claim(runs)
    curves = {r["run_id"]: _load_curve(out, r) for r in runs}
    adamp_curves = [c for r in runs if r["optimizer"] == "AdamP" and (c := curves[r["run_id"]])]
    firing = projection_firing(adamp_curves)
    _figures(out, runs, curves, firing)
    first = next((c for c in curves.values() if c), None)
    r0 = runs[0]
    params, sizes = "", ""
    if first:
        text = first["text"]
        params = f"{first['parameters']:,}-parameter"
        sizes = (
            f"{text['characters']:,} characters, {text['train_bytes']:,} bytes train, "
            f"{text['held_out_bytes']:,} held out"
        )
    lines = [
        f"## Language model: {r0['dataset']}, {r0['model']}",
        "",
        f"The paper: where few weights are scale invariant, AdamP does no harm (WikiText-103, "
        f"Transformer-XL: AdamW {PAPER_LM['AdamW']}, AdamP {PAPER_LM['AdamP']} perplexity). "
        f"Here a {params} byte-level transformer ({lm.LAYERS} pre-LayerNorm blocks, width "
        f"{lm.WIDTH}, {lm.HEADS} heads, context {lm.CONTEXT}) learns the standard library's "
        f"`pydoc_data.topics` (the reference topics `help()` shows: English prose and code "
        f"examples; {sizes}; the held-out part is the last {lm.HELD_OUT_FRACTION:.0%}). "
        f"{r0['steps']} steps of {lm.BATCH} windows, AdamW and AdamP at lr {lm.LR:g} (5 % "
        f"warm-up, then cosine), decoupled weight decay {lm.WEIGHT_DECAY:g} on every "
        f"parameter, seeds {sorted({r['seed'] for r in runs})}. Perplexity is per byte.",
        "",
        "| optimizer | seeds | held-out perplexity | std | 95 % CI ± | final train loss "
        "| ‖W‖ end ÷ start |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['optimizer']} | {r['n']} | {r['ppl_mean']:.4f} | {r['ppl_std']:.4f} | "
        f"{r['ppl_ci95']:.4f} | {r['train_loss']:.4f} | {r['growth']:.3f} |"
        for r in rows
    ]
    lines += ["", "![language-model curves](lm_curves.png)", "", "### The claim, checked", ""]
    if claim is None:
        lines.append("Not checked: no seed was run with both AdamW and AdamP.")
    else:
        paper = PAPER_LM["AdamP"] / PAPER_LM["AdamW"]
        lines.append(
            f"- No harm, AdamP vs AdamW: held-out perplexity ratio {claim['ratio']:.4f} "
            f"(95 % CI {claim['low']:.4f}–{claim['high']:.4f}, {claim['n']} seeds paired; "
            f"paper {paper:.4f}); non-inferiority margin {claim['margin']:.0%}, fixed before "
            f"the runs — {claim['verdict']}."
        )
    lines += ["", *_firing_lines(curves, firing), ""]
    return lines


def _firing_lines(curves: dict[str, Any], firing: list[dict[str, Any]]) -> list[str]:
    invariant = sorted({n for c in curves.values() if c for n in c["invariant"]})
    tested: list[str] = next((c["tested"] for c in curves.values() if c), [])
    lines = [
        "### Where AdamP projects",
        "",
        f"`adampx.inspect` finds {len(invariant)} of the {len(tested)} weights AdamP tests "
        f"scale invariant{': ' + ', '.join(invariant) if invariant else ''}. How often "
        "AdamP's cosine test projected each weight, over the logged steps of its runs:",
        "",
    ]
    if not firing:
        return [*lines, "No AdamP run recorded its tests.", ""]
    lines += [
        "| weight | scale invariant | steps tested | channel view | layer view | projected |",
        "|---|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {f['name']} | {'yes' if f['name'] in invariant else 'no'} | {f['tested']} | "
        f"{f['channel']} | {f['layer']} | {f['fraction']:.1%} |"
        for f in firing
    ]
    total = sum(f["tested"] for f in firing)
    projected = sum(f["channel"] + f["layer"] for f in firing)
    most = [f for f in sorted(firing, key=lambda f: -f["fraction"]) if f["fraction"] > 0][:3]
    often = ", ".join(f"{f['name']} ({f['fraction']:.0%})" for f in most) or "none"
    return [
        *lines,
        "",
        f"Overall the projection fired on {projected / total:.1%} of the tests; most often "
        f"on {often}. Where it does not fire, AdamP's step is AdamW's.",
        "",
        "![where AdamP projects](lm_projected.png)",
    ]


def _figures(
    out: Path,
    runs: list[dict[str, Any]],
    curves: dict[str, Any],
    firing: list[dict[str, Any]],
) -> None:
    """``lm_curves.png``: training loss and held-out perplexity per step, per optimizer
    (mean over seeds, each seed faint); ``lm_projected.png``: how often each weight was
    projected, and the fraction of tested weights projected per logged step."""
    plt = _pyplot()
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(12, 4.2))
    by_opt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in runs:
        if curves[r["run_id"]]:
            by_opt[r["optimizer"]].append(curves[r["run_id"]])
    for k, (opt, cs) in enumerate(sorted(by_opt.items())):
        color, style = f"C{k}", "-" if opt == "AdamP" else "--"
        for key, ax, field in (("curve", ax_loss, "train_loss"), ("evals", ax_ppl, "perplexity")):
            n = min(len(c[key]) for c in cs)
            steps = [cs[0][key][i]["step"] for i in range(n)]
            for c in cs:
                ax.plot(steps, [p[field] for p in c[key][:n]], style, color=color, alpha=0.25)
            mean = [statistics.fmean(c[key][i][field] for c in cs) for i in range(n)]
            ax.plot(steps, mean, style, color=color, label=f"{opt} (mean of {len(cs)})")
    ax_loss.set(xlabel="step", ylabel="training loss (nats per byte)", title="training loss")
    ax_ppl.set(xlabel="step", ylabel="perplexity per byte", title="held-out perplexity")
    ax_loss.legend()
    fig.tight_layout()
    fig.savefig(out / "lm_curves.png", dpi=110)
    plt.close(fig)
    if not firing:
        return
    fig, (ax_w, ax_s) = plt.subplots(1, 2, figsize=(13, 4.5))
    xs = range(len(firing))
    channel = [f["channel"] / f["tested"] for f in firing]
    ax_w.bar(xs, channel, label="channel view")
    ax_w.bar(xs, [f["layer"] / f["tested"] for f in firing], bottom=channel, label="layer view")
    ax_w.set_xticks(list(xs))
    ax_w.set_xticklabels([f["name"] for f in firing], rotation=60, ha="right", fontsize=7)
    ax_w.set(ylabel="fraction of logged steps projected", ylim=(0, 1.02))
    ax_w.set_title("AdamP: how often each weight was projected")
    ax_w.legend(fontsize=8)
    tested: dict[int, list[bool]] = defaultdict(list)  # per logged step, all seeds pooled
    for r in runs:
        c = curves[r["run_id"]]
        if r["optimizer"] == "AdamP" and c:
            for step, _, view in c["views"]:
                if view != "skipped":
                    tested[step].append(view in PROJECTED)
    steps = sorted(tested)
    seeds = sorted({r["seed"] for r in runs if r["optimizer"] == "AdamP"})
    ax_s.plot(steps, [sum(tested[s]) / len(tested[s]) for s in steps], label=f"seeds {seeds}")
    ax_s.set(xlabel="step", ylabel="fraction of tests projected", ylim=(-0.02, 1.02))
    ax_s.set_title("AdamP: fraction of its tests that projected, per logged step")
    ax_s.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "lm_projected.png", dpi=110)
    plt.close(fig)


def print_lm_summary(runs: list[dict[str, Any]]) -> None:
    """The language-model lines of the terminal summary."""
    rows = summarize_lm(runs)
    if not rows:
        return
    print("\nlanguage model: held-out perplexity per byte")
    print(f"  {'optimizer':<10}{'perplexity':>12}{'± 95% CI':>10}{'n':>4}")
    for r in rows:
        print(f"  {r['optimizer']:<10}{r['ppl_mean']:>12.4f}{r['ppl_ci95']:>10.4f}{r['n']:>4}")
    claim = lm_claim(runs)
    if claim is not None:
        print(
            f"\n- No harm, AdamP vs AdamW: perplexity ratio {claim['ratio']:.4f} (95 % CI "
            f"{claim['low']:.4f}–{claim['high']:.4f}), margin {claim['margin']:.0%} — "
            + claim["verdict"].replace("**", "")
        )
