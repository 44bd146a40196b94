"""The language-model task (``adampx reproduce --tasks lm``): text, model, measurement, claim.

Expected values are computed here independently: the text from ``pydoc_data`` itself, the
perplexity by a hand-written loop (and of a uniform model, 256), the claim's interval with
scipy. The runs are tiny (a few steps) and run through the command line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from scipy import stats

from adampx.__main__ import main
from adampx.experiments import lm
from adampx.experiments.lm_report import lm_claim, projection_firing
from adampx.experiments.runner import Settings, plan

STEPS = 10
LM_ARGS = ["--tasks", "lm", "--seeds", "0", "1", "--lm-steps", str(STEPS)]


def load(out: Path) -> dict[str, Any]:
    return json.loads((out / "results.json").read_text())


def without_seconds(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in runs]


@pytest.fixture(scope="module")
def text() -> lm.TextSplits:
    return lm.load_text()


@pytest.fixture(scope="module")
def lm_suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """AdamW and AdamP, seeds 0 and 1, a few steps each, in two worker processes."""
    out = tmp_path_factory.mktemp("lm") / "out"
    assert main(["reproduce", *LM_ARGS, "--jobs", "2", "--out", str(out)]) == 0
    return out


# ---------------------------------------------------------------------------- text and model


def test_text_is_pydoc_topics_split_90_10(text: lm.TextSplits) -> None:
    from pydoc_data.topics import topics

    whole = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    assert text.characters >= 400_000
    assert bytes(torch.cat([text.train, text.held_out]).tolist()) == whole
    assert len(text.held_out) == len(whole) - int(0.9 * len(whole))  # the end is held out
    assert text.train.dtype == torch.uint8


def test_model_is_a_causal_layernorm_transformer() -> None:
    torch.manual_seed(0)
    model = lm.TinyTransformer()
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(model.blocks) >= 2 and len(norms) == 2 * len(model.blocks) + 1
    x = torch.randint(0, 256, (2, lm.CONTEXT))
    y = x.clone()
    t = 40
    y[:, t] = (y[:, t] + 1) % 256  # change one byte
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, lm.CONTEXT, 256)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=0)  # the past cannot see it
    assert (a[:, t:] - b[:, t:]).abs().amax(-1).min() > 0  # every later position does
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, lm.CONTEXT + 1, dtype=torch.long))


def test_held_out_perplexity_is_the_mean_over_windows(text: lm.TextSplits) -> None:
    torch.manual_seed(1)
    model = lm.TinyTransformer()
    data = text.held_out[: 10 * lm.CONTEXT + 7]
    got = lm.held_out_perplexity(model, data, batch=3)
    # by hand: every full window of CONTEXT inputs (plus the next byte), position by position
    model.eval()
    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(data) - lm.CONTEXT, lm.CONTEXT):
            chunk = data[start : start + lm.CONTEXT + 1].long()
            log_p = torch.log_softmax(model(chunk[None, :-1])[0].double(), -1)
            nll -= float(log_p[torch.arange(lm.CONTEXT), chunk[1:]].sum())
            count += lm.CONTEXT
    assert got == pytest.approx(math.exp(nll / count), rel=1e-5)
    # a model that predicts every byte alike: perplexity 256
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    assert lm.held_out_perplexity(model, data) == pytest.approx(256.0, rel=1e-5)  # float32


# ---------------------------------------------------------------------------- the task


@pytest.mark.parametrize(
    ("suite", "seeds", "expected"),
    [("quick", None, range(5)), ("full", None, range(10)), ("quick", [7, 3], [7, 3])],
)
def test_lm_plan_pairs_the_optimizers_by_seed(
    suite: str, seeds: list[int] | None, expected: Any
) -> None:
    s = Settings(suite=suite, tasks=["lm"], seeds=seeds).resolved()
    runs = plan(s)
    assert [(r.method, r.seed) for r in runs] == [
        (opt, seed) for opt in ("AdamW", "AdamP") for seed in expected
    ]
    assert {r.task for r in runs} == {"lm"} and s.lm_steps == lm.LM_STEPS[suite]


def test_the_default_suite_is_the_61_runs_without_lm() -> None:
    runs = plan(Settings().resolved())
    tasks = [r.task for r in runs]
    assert len(runs) == 61 and "lm" not in tasks
    assert tasks.count("classification") == 27  # 5 optimizers × 3 seeds, 4 × 3 without decay


def test_lm_runs_are_recorded(lm_suite: Path) -> None:
    results = load(lm_suite)
    runs = results["runs"]
    assert results["settings"]["lm_steps"] == STEPS and results["failed"] == []
    assert sorted((r["optimizer"], r["seed"]) for r in runs) == [
        ("AdamP", 0), ("AdamP", 1), ("AdamW", 0), ("AdamW", 1),
    ]  # fmt: skip
    starts = {}
    for r in runs:
        assert r["task"] == "lm" and r["dataset"] == "pydoc_data.topics"
        assert r["steps"] == STEPS and r["lr"] == lm.LR and r["weight_decay"] == lm.WEIGHT_DECAY
        assert r["test_accuracy"] is None and r["final_error"] is None and r["epochs"] is None
        assert 1 < r["test_perplexity"] < 256  # better than a uniform guess already
        curve = json.loads((lm_suite / r["curve"]).read_text())
        assert r["test_perplexity"] == curve["evals"][-1]["perplexity"]
        assert [e["step"] for e in curve["evals"]] == [2, 4, 6, 8, 10]
        assert [c["step"] for c in curve["curve"]] == list(range(1, STEPS + 1))
        assert r["train_loss"] == curve["curve"][-1]["train_loss"]
        model = lm.TinyTransformer()
        assert curve["parameters"] == sum(p.numel() for p in model.parameters())
        assert curve["tested"] == [n for n, p in model.named_parameters() if p.dim() > 1]
        assert curve["invariant"] == []  # no weight of this transformer is scale invariant
        names = {name for _, name, _ in curve["views"]}
        if r["optimizer"] == "AdamP":  # every param at every logged step, with its name
            assert len(curve["views"]) == STEPS * len(list(model.parameters()))
            assert names == {n for n, _ in model.named_parameters()}
        else:
            assert curve["views"] == []
        starts.setdefault(r["seed"], set()).add(r["norm_start"])
    # both optimizers of a seed start from the same weights, the seeds from different ones
    assert all(len(s) == 1 for s in starts.values()) and len(set.union(*starts.values())) == 2


def test_lm_in_one_process_gives_the_workers_numbers(lm_suite: Path, tmp_path: Path) -> None:
    """Seed 1 again, one run after the other in this process: the workers' numbers, bit for
    bit (both with one intra-op thread per run; the runs are independent of each other)."""
    out = tmp_path / "one"
    args = ["--tasks", "lm", "--seeds", "1", "--lm-steps", str(STEPS), "--jobs", "1"]
    assert main(["reproduce", *args, "--out", str(out)]) == 0
    workers = [r for r in load(lm_suite)["runs"] if r["seed"] == 1]
    assert without_seconds(load(out)["runs"]) == without_seconds(workers)
    for r in workers:
        assert (out / r["curve"]).read_text() == (lm_suite / r["curve"]).read_text()


def test_lm_report_states_margin_verdict_firing_and_figures(lm_suite: Path) -> None:
    report = (lm_suite / "report.md").read_text()
    runs = load(lm_suite)["runs"]
    claim = lm_claim(runs)
    assert claim is not None
    assert "## Language model: pydoc_data.topics" in report
    assert f"non-inferiority margin {lm.NON_INFERIORITY_MARGIN:.0%}" in report
    assert f"held-out perplexity ratio {claim['ratio']:.4f}" in report
    assert claim["verdict"] in report
    # every weight AdamP tests is in the firing table: not invariant, tested at every step
    for name in json.loads((lm_suite / runs[0]["curve"]).read_text())["tested"]:
        assert f"| {name} | no | {2 * STEPS} |" in report
    assert "### Where AdamP projects" in report
    for name in ("lm_curves.png", "lm_projected.png"):
        assert f"]({name})" in report
        data = (lm_suite / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


# ---------------------------------------------------------------------------- the claim


def lm_record(opt: str, seed: int, ppl: float) -> dict[str, Any]:
    return {"task": "lm", "optimizer": opt, "seed": seed, "test_perplexity": ppl}


def paired(adamw: list[float], ratios: list[float]) -> list[dict[str, Any]]:
    return [lm_record("AdamW", s, p) for s, p in enumerate(adamw)] + [
        lm_record("AdamP", s, p * r) for s, (p, r) in enumerate(zip(adamw, ratios, strict=True))
    ]


@pytest.mark.parametrize(
    ("ratios", "verdict"),
    [
        ([1.001, 1.004, 0.998, 1.002], "**shown**"),
        ([0.990, 0.991, 0.989, 0.990], "**shown**"),  # better, beyond the interval
        ([1.05, 1.06, 1.04, 1.05], "**not shown**"),
        ([1.00, 1.04, 0.99, 1.05], "**not resolved**"),
    ],
)
def test_lm_claim_is_a_paired_t_interval_of_the_log_ratio(
    ratios: list[float], verdict: str
) -> None:
    adamw = [5.1, 5.3, 4.9, 5.2]
    claim = lm_claim(paired(adamw, ratios))
    assert claim is not None
    logs = np.log(np.array(ratios))
    half = stats.t.ppf(0.975, len(logs) - 1) * logs.std(ddof=1) / math.sqrt(len(logs))
    assert claim["ratio"] == pytest.approx(math.exp(logs.mean()), rel=1e-9)
    assert claim["low"] == pytest.approx(math.exp(logs.mean() - half), rel=1e-9)
    assert claim["high"] == pytest.approx(math.exp(logs.mean() + half), rel=1e-9)
    assert claim["verdict"].startswith(verdict)
    better = "better, beyond the interval" in claim["verdict"]
    assert better == (claim["high"] < 1)
    if verdict == "**shown**":
        assert claim["high"] < 1 + lm.NON_INFERIORITY_MARGIN


def test_lm_claim_needs_paired_seeds() -> None:
    assert lm_claim([lm_record("AdamW", 0, 5.0), lm_record("AdamP", 1, 5.0)]) is None
    one = lm_claim(paired([5.0], [1.0]))
    assert one is not None and one["verdict"] == "not resolvable with one seed"
    assert math.isnan(one["high"])


def test_projection_firing_counts_each_view() -> None:
    curves = [
        {"views": [[1, "a", "channel"], [1, "b", "none"], [1, "c", "skipped"], [2, "a", "none"],
                   [2, "b", "layer"]]},
        {"views": [[1, "a", "layer"], [1, "b", "none"]]},
    ]  # fmt: skip
    assert projection_firing(curves) == [
        {"name": "a", "tested": 3, "channel": 1, "layer": 1, "fraction": pytest.approx(2 / 3)},
        {"name": "b", "tested": 3, "channel": 0, "layer": 1, "fraction": pytest.approx(1 / 3)},
    ]
