"""``NormMonitor`` (records, files, callback, hooks, errors, GradScaler), ``param_groups`` and
the plots, each checked against numbers computed in this file from the training loop."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import adampx
from adampx import AdamP, NormMonitor, param_groups
from adampx.tools.inspection import Report
from adampx.tools.monitor import NormRecord, read_records

matplotlib.use("Agg")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- helpers


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 8, bias=False),  # 0: → LayerNorm, layer invariant
        nn.LayerNorm(8),  # 1
        nn.ReLU(),  # 2
        nn.Linear(8, 8),  # 3
        nn.ReLU(),  # 4
        nn.Linear(8, 3),  # 5
    ).double()


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(500 + i)
    return (
        torch.randn(12, 5, generator=gen, dtype=torch.float64),
        torch.randn(12, 3, generator=gen, dtype=torch.float64),
    )


def make_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    params = list(model.parameters())
    # two groups with different learning rates: the record must take its own group's lr
    groups = [{"params": params[:2], "lr": 0.03}, {"params": params[2:]}]
    if kind == "SGD":
        return torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    if kind == "Adam":
        return torch.optim.Adam(groups, lr=0.01)
    return AdamP(groups, lr=0.01, weight_decay=0.01)


def train(
    model: nn.Module, opt: torch.optim.Optimizer, steps: int, tracked: list[str] | None = None
) -> list[dict[str, dict[str, float]]]:
    """Train ``steps`` steps; per step, the direct numbers of every tracked param."""
    named = dict(model.named_parameters())
    tracked = tracked if tracked is not None else [n for n, p in named.items() if p.dim() > 1]
    lr_of = {p: g["lr"] for g in opt.param_groups for p in g["params"]}
    history = []
    for i in range(steps):
        x, y = batch(i)
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        before = {n: named[n].detach().clone() for n in tracked}
        opt.step()
        row = {}
        for n in tracked:
            after = named[n].detach()
            norm = torch.linalg.vector_norm(after).item()
            update = torch.linalg.vector_norm(after - before[n]).item()
            lr = float(lr_of[named[n]])
            row[n] = dict(
                norm=norm,
                update_norm=update,
                lr=lr,
                effective_step=lr / norm**2,
                relative_update=update / torch.linalg.vector_norm(before[n]).item(),
            )
        history.append(row)
    return history


def check_records(
    records: list[NormRecord], history: list[dict[str, dict[str, float]]], every: int
) -> None:
    logged = [s for s in range(1, len(history) + 1) if s % every == 0]
    names = list(history[0])
    assert [(r.step, r.name) for r in records] == [(s, n) for s in logged for n in names]
    for r in records:
        exp = history[r.step - 1][r.name]
        for key, value in exp.items():
            assert getattr(r, key) == pytest.approx(value, rel=1e-12), (r.step, r.name, key)


# ---------------------------------------------------------------------------- NormMonitor


@pytest.mark.parametrize("kind", ["SGD", "Adam", "AdamP"])
def test_records_every_k_steps_agree_with_direct_computation(kind: str) -> None:
    model = make_model()
    opt = make_optimizer(kind, model)
    with NormMonitor(model, opt, every=3) as monitor:
        history = train(model, opt, 7)
    assert monitor.steps == 7
    assert {r.step for r in monitor.records} == {3, 6}
    check_records(monitor.records, history, every=3)
    # the lr of each param's own group
    assert {r.lr for r in monitor.records if r.name == "0.weight"} == {0.03}


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_files_parse_and_equal_the_records(tmp_path: Path, suffix: str) -> None:
    model = make_model()
    opt = make_optimizer("AdamP", model)
    path = tmp_path / "sub" / f"norms{suffix}"
    monitor = NormMonitor(model, opt, every=2, path=path)
    history = train(model, opt, 5)
    monitor.close()
    check_records(monitor.records, history, every=2)
    assert len(monitor.records) == 2 * 3

    with path.open(newline="") as f:
        if suffix == ".csv":
            rows: list[dict[str, Any]] = list(csv.DictReader(f))
        else:
            rows = [json.loads(line) for line in f if line.strip()]
    assert len(rows) == len(monitor.records)
    for row, rec in zip(rows, monitor.records, strict=True):
        assert int(row["step"]) == rec.step
        assert row["name"] == rec.name
        for key in ("norm", "update_norm", "lr", "effective_step", "relative_update"):
            assert float(row[key]) == getattr(rec, key), key
    assert read_records(path) == monitor.records


def test_callback_receives_each_batch() -> None:
    model = make_model()
    opt = make_optimizer("SGD", model)
    batches: list[list[NormRecord]] = []
    with NormMonitor(model, opt, every=2, callback=batches.append) as monitor:
        history = train(model, opt, 6)
    assert len(batches) == 3
    assert [{r.step for r in b} for b in batches] == [{2}, {4}, {6}]
    assert [r for b in batches for r in b] == monitor.records
    check_records([r for b in batches for r in b], history, every=2)


def test_track_predicate() -> None:
    model = make_model()
    opt = make_optimizer("Adam", model)
    wanted = ["0.weight", "1.weight", "3.bias"]
    with NormMonitor(model, opt, track=lambda n, p: n in wanted) as monitor:
        history = train(model, opt, 2, tracked=wanted)
    assert {r.name for r in monitor.records} == set(wanted)
    check_records(monitor.records, history, every=1)
    with pytest.raises(ValueError):
        NormMonitor(model, opt, track=lambda n, p: False)


def test_close_removes_hooks() -> None:
    model = make_model()
    opt = make_optimizer("SGD", model)
    monitor = NormMonitor(model, opt)
    train(model, opt, 2)
    assert len(monitor.records) == 2 * 3
    monitor.close()
    snapshot = list(monitor.records)
    train(model, opt, 3)
    assert monitor.records == snapshot
    assert monitor.steps == 2


def test_bad_arguments_raise_value_error(tmp_path: Path) -> None:
    model = make_model()
    opt = make_optimizer("SGD", model)
    for every in (0, -1, 2.5, "2"):
        with pytest.raises(ValueError):
            NormMonitor(model, opt, every=every)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        NormMonitor(model, opt, path=tmp_path / "norms.txt")
    assert not (tmp_path / "norms.txt").exists()
    partial = torch.optim.SGD(list(model.parameters())[:2], lr=0.1)
    with pytest.raises(ValueError):
        NormMonitor(model, partial)


def test_grad_scaler_skipped_step_produces_no_record() -> None:
    model = make_model()
    opt = make_optimizer("AdamP", model)
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    named = dict(model.named_parameters())
    tracked = [n for n, p in named.items() if p.dim() > 1]
    history = []
    with NormMonitor(model, opt) as monitor:
        for i in range(4):
            x, y = batch(i)
            opt.zero_grad()
            scaler.scale(F.mse_loss(model(x), y)).backward()
            if i == 1:
                named["3.weight"].grad[0, 0] = float("inf")
            before = {n: named[n].detach().clone() for n in tracked}
            scaler.step(opt)
            scaler.update()
            skipped = all(torch.equal(named[n], before[n]) for n in tracked)
            assert skipped == (i == 1)
            if not skipped:
                history.append(
                    {
                        n: torch.linalg.vector_norm(named[n].detach() - before[n]).item()
                        for n in tracked
                    }
                )
    assert monitor.steps == 3
    assert sorted({r.step for r in monitor.records}) == [1, 2, 3]
    assert len(monitor.records) == 3 * len(tracked)
    # the step after the skipped one measures its own update, not a stale snapshot
    for r in monitor.records:
        assert r.update_norm == pytest.approx(history[r.step - 1][r.name], rel=1e-12)
        assert math.isfinite(r.norm) and r.update_norm > 0


# ---------------------------------------------------------------------------- param_groups


def conv_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, bias=False),  # 0: → BatchNorm, channel invariant
        nn.BatchNorm2d(4),  # 1
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16, 6),  # 4: plain
        nn.LayerNorm(6),  # 5
        nn.Linear(6, 3),  # 6: head
    )


def images() -> torch.Tensor:
    return torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(9))


def names_of(group: dict[str, Any]) -> list[str]:
    return [n for n, _ in group["params"]]


def test_param_groups_without_report() -> None:
    model = conv_model()
    groups = param_groups(model)
    small = [n for n, p in model.named_parameters() if p.dim() <= 1]
    big = [n for n, p in model.named_parameters() if p.dim() > 1]
    assert len(groups) == 2
    assert names_of(groups[0]) == big and set(groups[0]) == {"params"}
    assert names_of(groups[1]) == small and groups[1]["weight_decay"] == 0.0
    assert "projection" not in groups[1]
    kept = param_groups(model, decay_1d=True)
    assert names_of(kept[1]) == small and "weight_decay" not in kept[1]


def test_param_groups_with_report() -> None:
    model = conv_model()
    report = adampx.inspect(model, images())
    found = {r.name: r.invariance for r in report}
    assert found["0.weight"] == "channel"
    not_inv = [n for n, p in model.named_parameters() if p.dim() > 1 and found[n] == "none"]
    assert "6.weight" in not_inv
    groups = param_groups(model, report=report)
    main = next(g for g in groups if "projection" not in g and "weight_decay" not in g)
    plain = next(g for g in groups if g.get("projection") is False)
    assert "0.weight" in names_of(main)
    assert names_of(plain) == not_inv
    assert not set(names_of(main)) & set(not_inv)


def test_param_groups_feed_adamp_and_adamw() -> None:
    model = conv_model()
    report = adampx.inspect(model, images())
    all_names = [n for n, _ in model.named_parameters()]
    for make in (
        lambda g: AdamP(g, lr=0.1, weight_decay=0.5),
        lambda g: torch.optim.AdamW(g, lr=0.1, weight_decay=0.5),
    ):
        groups = param_groups(model, report=report)
        group_names = [names_of(g) for g in groups]  # torch rewrites the dicts it is given
        opt = make(groups)
        assert [g["weight_decay"] for g in opt.param_groups] == [0.5, 0.5, 0.0]
        model.zero_grad()
        F.mse_loss(model(images()), torch.zeros(8, 3)).backward()
        opt.step()
        sd = opt.state_dict()
        saved_names = [n for g in sd["param_groups"] for n in g["param_names"]]
        assert sorted(saved_names) == sorted(all_names)
        assert [g["param_names"] for g in sd["param_groups"]] == group_names


def test_param_groups_decay_reaches_adamp_as_algorithm_says() -> None:
    """Zero gradients: AdamP's update is zero and only the decay acts. The projected group
    decays by lr·λ·wd_ratio (a zero gradient passes the test), the projection=False group by
    lr·λ, the 1-d group not at all."""
    model = conv_model()
    report = adampx.inspect(model, images())
    groups = param_groups(model, report=report)
    lr, wd, ratio = 0.1, 0.5, 0.1
    factor = {}
    for g in groups:
        f = 1.0 if "weight_decay" in g else 1 - lr * wd * (1.0 if "projection" in g else ratio)
        factor.update(dict.fromkeys(names_of(g), f))
    assert set(factor.values()) == {1.0, 1 - lr * wd, 1 - lr * wd * ratio}
    opt = AdamP(groups, lr=lr, weight_decay=wd, wd_ratio=ratio)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] * factor[n], rtol=1e-6, atol=0)


def test_param_groups_report_missing_parameters() -> None:
    model = conv_model()
    report = adampx.inspect(model, images())
    with pytest.raises(ValueError):
        param_groups(model, report=Report(report[:-1]))
    with pytest.raises(ValueError):
        param_groups(model, report=Report(r for r in report if r.name != "0.weight"))


# ---------------------------------------------------------------------------- plots


def test_plots_write_png(tmp_path: Path) -> None:
    from adampx.tools.plots import plot_norm_curves, plot_norm_growth, plot_projection_fraction

    runs: dict[str, list[NormRecord]] = {}
    stats: dict[str, list[Any]] = {}
    for kind in ("SGD", "AdamP"):
        model = make_model()
        opt = make_optimizer(kind, model)
        if kind == "AdamP":
            for g in opt.param_groups:
                g["track_statistics"] = True
        collected: list[Any] = []
        with NormMonitor(model, opt) as monitor:
            for i in range(4):
                train(model, opt, 1)
                if kind == "AdamP":
                    collected += opt.statistics()
                    assert {r.step for r in opt.statistics()} == {i + 1}
        runs[kind] = monitor.records
        if collected:
            stats[kind] = collected
    assert stats["AdamP"]

    outputs = [
        plot_norm_curves(runs, tmp_path / "curves.png", title="curves"),
        plot_norm_growth(runs, tmp_path / "growth.png"),
        plot_projection_fraction(stats, tmp_path / "nested" / "fraction.png"),
    ]
    expected = [tmp_path / "curves.png", tmp_path / "growth.png", tmp_path / "nested/fraction.png"]
    assert [Path(o) for o in outputs] == expected
    for path in expected:
        data = path.read_bytes()
        assert len(data) > 1000
        assert data[:8] == PNG_MAGIC


class _RecordingWriter:
    """Stands in for ``torch.utils.tensorboard.SummaryWriter`` (its add_scalar/flush API)."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []
        self.flushed = False

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        self.flushed = True


def test_tensorboard_writer_gets_every_record() -> None:
    model = make_model()
    optimizer = make_optimizer("AdamP", model)
    writer = _RecordingWriter()
    with NormMonitor(model, optimizer, every=2, tensorboard=writer) as monitor:
        train(model, optimizer, 4)
    expected = [
        (f"{key}/{r.name}", getattr(r, key), r.step)
        for r in monitor.records
        for key in ("norm", "update_norm", "effective_step", "relative_update")
    ]
    assert monitor.records and writer.scalars == expected
    assert writer.flushed  # a writer the user passed is flushed, not closed
