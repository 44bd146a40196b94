"""Which weights of a model are scale invariant, found by probing, and what AdamP decides.

``adampx.inspect(model, *example_inputs)`` answers, for every parameter:

- **invariance**, measured: the parameter is scaled (each output channel by its own factor,
  then the whole tensor by one factor), the model is run forward again in training mode on
  the same inputs, and the output compared with the unscaled output. ``"channel"`` if the
  output is unchanged under per-channel scaling (conv → BatchNorm, weight standardization),
  ``"layer"`` if only under whole-tensor scaling (bias-free linear → LayerNorm, conv →
  GroupNorm), ``"none"`` otherwise. Normalization layers add ``eps`` to the variance, so
  invariance holds only up to a relative change of about ``eps / variance``; ``rtol`` sets the
  tolerance and every record carries the measured change.
- **AdamP's decision** on a real gradient of that batch: the cosine test of
  ``adampx.algorithm.projection`` (which view would fire, the largest cosine and its threshold).

The model is left as it was: parameter values, gradients, buffers (BatchNorm running
statistics), the training flag of every module and the RNG state are restored.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from adampx.algorithm.projection import decide, is_projectable, row_statistics

__all__ = ["ParamReport", "Report", "inspect"]


@dataclass(frozen=True)
class ParamReport:
    """What :func:`inspect` found for one parameter.

    Attributes:
        name: the parameter's name in ``model.named_parameters()``.
        shape: its shape.
        invariance: ``"channel"``, ``"layer"`` or ``"none"`` (measured by probing).
        channel_change: relative output change when each output channel is scaled.
        layer_change: relative output change when the whole tensor is scaled.
        adamp_view: the view AdamP's cosine test picks on the probe gradient, ``"channel"``,
            ``"layer"`` or ``"none"``; ``"skipped"`` for 0-d/1-d tensors (never projected)
            and for parameters without a gradient.
        max_cosine: ``max_i |cos(g_i, p_i)|`` over output channels (NaN when skipped).
        channel_threshold: ``delta / sqrt(N / n0)``, the channel view's threshold.
        layer_cosine: ``|cos(g, p)|`` of the whole tensor (NaN when skipped).
        layer_threshold: ``delta / sqrt(N)``, the layer view's threshold.
        note: why a result is not what it seems (e.g. an all-zero tensor, which scaling
            cannot change, is reported ``"none"``).
    """

    name: str
    shape: tuple[int, ...]
    invariance: str
    channel_change: float
    layer_change: float
    adamp_view: str
    max_cosine: float
    channel_threshold: float
    layer_cosine: float
    layer_threshold: float
    note: str = ""

    @property
    def agrees(self) -> bool:
        """Whether AdamP's test found the invariance the probe measured (1-d: not tested)."""
        if self.adamp_view == "skipped":
            return True
        return self.adamp_view == self.invariance


class Report(list[ParamReport]):
    """A list of :class:`ParamReport` that prints as a table."""

    def __str__(self) -> str:
        width = max([len("parameter"), *(len(r.name) for r in self)]) + 2
        header = (
            f"{'parameter':<{width}}{'shape':<18}{'invariance':<11}"
            f"{'Δout chan':>10}{'Δout layer':>11}  {'AdamP view':<10}{'max|cos|':>9}{'thresh':>9}"
        )
        lines = [header, "-" * len(header)]
        for r in self:
            cos = "" if math.isnan(r.max_cosine) else f"{r.max_cosine:9.2e}"
            thr = "" if math.isnan(r.max_cosine) else f"{r.channel_threshold:9.2e}"
            flag = "" if r.agrees else "  <- probe and cosine test differ"
            flag += f"  ({r.note})" if r.note else ""
            lines.append(
                f"{r.name:<{width}}{'×'.join(map(str, r.shape)) or 'scalar':<18}"
                f"{r.invariance:<11}{r.channel_change:>10.1e}{r.layer_change:>11.1e}"
                f"  {r.adamp_view:<10}{cos:>9}{thr:>9}{flag}"
            )
        return "\n".join(lines)


@contextmanager
def _preserved(model: nn.Module) -> Iterator[None]:
    """Restore params, grads, buffers, training flags and RNG state on exit."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    modes = {m: m.training for m in model.modules()}
    rng = torch.random.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(params[n])
                p.grad = grads[n]
            for n, b in model.named_buffers():
                b.copy_(buffers[n])
        for m, mode in modes.items():
            m.training = mode
        torch.random.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def _flatten(output: Any) -> Tensor:
    """All floating-point tensors of a (nested) model output, as one float64 vector."""
    if isinstance(output, Tensor):
        return output.detach().reshape(-1).double()
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        parts = [_flatten(o) for o in output]
        parts = [p for p in parts if p.numel()]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    return torch.zeros(0, dtype=torch.float64)


def _relative_change(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / a.norm().clamp_min(torch.finfo(torch.float64).tiny))


def inspect(
    model: nn.Module,
    *example_inputs: Any,
    rtol: float = 1e-3,
    delta: float = 0.1,
    eps: float = 1e-8,
    loss_fn: Callable[[Any], Tensor] | None = None,
    seed: int = 0,
) -> Report:
    """Probe every parameter of ``model`` for scale invariance; report AdamP's decision too.

    Args:
        model: any module; it is run forward in training mode (and backward once).
        *example_inputs: positional inputs for ``model(*example_inputs)``, a real batch (a
            batch of one sample makes BatchNorm degenerate).
        rtol: largest relative change of the output that still counts as invariant.
        delta: AdamP's threshold for the cosine test.
        eps: AdamP's eps for the cosine test.
        loss_fn: maps the output to the scalar whose gradient feeds the cosine test; the
            default is a fixed random linear function of all outputs.
        seed: seeds the scale factors and the default loss.

    Returns:
        A :class:`Report` (a list of :class:`ParamReport`, one per parameter, in
        ``named_parameters`` order) whose ``str`` is a table.
    """
    if not example_inputs:
        raise ValueError("inspect needs example inputs: inspect(model, x, ...)")
    if not rtol > 0:
        raise ValueError(f"Invalid rtol: {rtol} (must be > 0)")
    generator = torch.Generator().manual_seed(seed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    with _preserved(model):
        model.train()
        rng = torch.random.get_rng_state()

        def forward() -> Any:
            torch.random.set_rng_state(rng)  # same dropout masks in every probe
            return model(*example_inputs)

        with torch.no_grad():
            base = _flatten(forward())
        if base.numel() == 0:
            raise ValueError("the model's output holds no floating-point tensor to compare")

        changes: dict[str, tuple[float, float]] = {}
        for name, p in named:
            changes[name] = (
                _probe(p, forward, base, generator, per_channel=True),
                _probe(p, forward, base, generator, per_channel=False),
            )

        grads = _probe_gradients(model, named, forward, loss_fn, generator)

    report = Report()
    for name, p in named:
        channel_change, layer_change = changes[name]
        note = ""
        if not bool(p.detach().any()):
            invariance, note = "none", "all zero: scaling cannot change it, not probed"
        elif p.dim() >= 1 and channel_change <= rtol:
            invariance = "channel"
        elif layer_change <= rtol:
            invariance = "layer"
        else:
            invariance = "none"
        record = _adamp_decision(
            name, p, grads.get(name), invariance, channel_change, layer_change, delta, eps
        )
        report.append(dataclasses.replace(record, note=note))
    return report


def _probe(
    p: Tensor,
    forward: Callable[[], Any],
    base: Tensor,
    generator: torch.Generator,
    *,
    per_channel: bool,
) -> float:
    """Relative output change after scaling ``p`` (per output channel or as a whole)."""
    if p.dim() == 0 or p.numel() == 0:
        per_channel = False
    n = p.shape[0] if per_channel else 1
    factors = 1.5 + 1.5 * torch.rand(n, generator=generator, dtype=torch.float64)
    shape = (n,) + (1,) * (p.dim() - 1) if p.dim() else ()
    original = p.detach().clone()
    with torch.no_grad():
        p.mul_(factors.to(p.device, p.real.dtype if p.is_complex() else p.dtype).view(shape))
        changed = _flatten(forward())
        p.copy_(original)
    return _relative_change(base, changed)


def _probe_gradients(
    model: nn.Module,
    named: Sequence[tuple[str, Tensor]],
    forward: Callable[[], Any],
    loss_fn: Callable[[Any], Tensor] | None,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """Gradients of one backward pass of the probe loss."""
    for _, p in named:
        p.grad = None
    with torch.enable_grad():  # inspect may be called under torch.no_grad()
        output = forward()
        if loss_fn is None:
            flat = torch.cat([o.reshape(-1) for o in _tensors(output)])
            weights = torch.randn(flat.numel(), generator=generator, dtype=torch.float64)
            loss = (flat * weights.to(flat.device, flat.dtype)).sum()
        else:
            loss = loss_fn(output)
        loss.backward()
    return {n: p.grad.detach().clone() for n, p in named if p.grad is not None}


def _tensors(output: Any) -> list[Tensor]:
    if isinstance(output, Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, dict):
        output = list(output.values())
    if isinstance(output, (list, tuple)):
        return [t for o in output for t in _tensors(o)]
    return []


def _adamp_decision(
    name: str,
    p: Tensor,
    grad: Tensor | None,
    invariance: str,
    channel_change: float,
    layer_change: float,
    delta: float,
    eps: float,
) -> ParamReport:
    shape = tuple(p.shape)
    if not is_projectable(p) or grad is None:
        nan = float("nan")
        return ParamReport(
            name, shape, invariance, channel_change, layer_change, "skipped", nan, nan, nan, nan
        )
    w = torch.view_as_real(p.detach()) if p.is_complex() else p.detach()
    g = torch.view_as_real(grad) if grad.is_complex() else grad
    stats = row_statistics(w.double(), g.double())
    decision = decide(stats, delta, eps)
    view = "channel" if bool(decision.channel) else "layer" if bool(decision.layer) else "none"
    return ParamReport(
        name,
        shape,
        invariance,
        channel_change,
        layer_change,
        view,
        float(decision.max_cosine_channel),
        decision.channel_threshold,
        float(decision.cosine_layer),
        decision.layer_threshold,
    )
