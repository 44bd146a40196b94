"""The paper's two toy problems, run through this library's SGDP.

Both objectives depend on the direction of ``w`` only, so ``w`` is scale invariant and its
gradient is orthogonal to it. The weight is shaped ``[1, d]`` (one row): 1-d tensors are
never projected, and the single row makes the channel view and the layer view coincide.
"Without projection" is ``SGDP(delta=0)``, which never projects and is exactly SGD with
momentum (tested against ``torch.optim.SGD``); "with projection" is ``SGDP(delta=0.1)``.

2-D toy: minimise ``−⟨w/‖w‖, w*⟩`` from ``w0 = (1, 0)`` (``‖w0‖ = 1``) towards the unit
``w*`` at 135°, 100 steps, lr 0.01, for GD and GD with momentum 0.9 and 0.99.

3-D toy: the Rosenbrock function ``f(a, b) = (1 − a)² + 100 (b − a²)²`` of the two angles of
``w`` on the sphere, ``w = r (sin b cos a, sin b sin a, cos b)`` (``a`` the azimuth, ``b``
the polar angle; ``a = atan2(w1, w0)``, ``b = atan2(sqrt(w0² + w1²), w2)``), so the radius
``r`` is redundant. Start at ``(a, b) = (−2, 2)``, ``r = 1``; optimum ``(1, 1)``; 200
iterations of momentum-0.9 GD, alone, with weight decay, with the projection, and with both.
The paper gives no learning rates: each method runs over a stated grid of learning rates
and the one with the lowest final ``f`` is reported (all runs are kept in the results).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from adampx import SGDP

__all__ = [
    "TOY2D_METHODS",
    "TOY3D_LRS",
    "TOY3D_METHODS",
    "ToyRun",
    "run_toy2d",
    "run_toy3d",
]

# label -> (momentum, projection)
TOY2D_METHODS: dict[str, tuple[float, bool]] = {
    "GD": (0.0, False),
    "GD + projection": (0.0, True),
    "GD momentum 0.9": (0.9, False),
    "GD momentum 0.9 + projection": (0.9, True),
    "GD momentum 0.99": (0.99, False),
    "GD momentum 0.99 + projection": (0.99, True),
}
TOY2D_LR = 0.01
TOY2D_STEPS = 100
TOY2D_TARGET_DEG = 135.0

# label -> (projection, weight decay); all with momentum 0.9 and wd_ratio 1 (so that the
# same λ means the same decay with and without the projection).
TOY3D_METHODS: dict[str, tuple[bool, float]] = {
    "momentum GD": (False, 0.0),
    "momentum GD + weight decay": (False, 1.0),
    "momentum GD + projection": (True, 0.0),
    "momentum GD + projection + weight decay": (True, 1.0),
}
TOY3D_LRS = (1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2)
TOY3D_STEPS = 200
TOY3D_MOMENTUM = 0.9
TOY3D_START = (-2.0, 2.0)
TOY3D_OPTIMUM = (1.0, 1.0)


@dataclass
class ToyRun:
    """One optimisation of a toy problem.

    Attributes:
        task: ``"toy2d"`` or ``"toy3d"``.
        method: the label of the method (a key of ``TOY2D_METHODS`` / ``TOY3D_METHODS``).
        lr, momentum, weight_decay, projection: the SGDP settings.
        norms: ``‖w‖`` at every step, starting with ``‖w0‖``.
        errors: 2-D: angle to ``w*`` in degrees; 3-D: the Rosenbrock value ``f``; per step.
        path: 2-D: the point ``w`` per step; 3-D: the angles ``(a, b)`` per step.
    """

    task: str
    method: str
    lr: float
    momentum: float
    weight_decay: float
    projection: bool
    norms: list[float] = field(default_factory=list)
    errors: list[float] = field(default_factory=list)
    path: list[list[float]] = field(default_factory=list)


def _optimizer(w: Tensor, lr: float, momentum: float, projection: bool, wd: float) -> SGDP:
    return SGDP(
        [w], lr=lr, momentum=momentum, weight_decay=wd, delta=0.1 if projection else 0.0,
        wd_ratio=1.0,
    )  # fmt: skip


def run_toy2d(method: str, *, lr: float = TOY2D_LR, steps: int = TOY2D_STEPS) -> ToyRun:
    """Minimise ``−⟨w/‖w‖, w*⟩`` with one of :data:`TOY2D_METHODS` (float64)."""
    momentum, projection = TOY2D_METHODS[method]
    target = math.radians(TOY2D_TARGET_DEG)
    w_star = torch.tensor([[math.cos(target), math.sin(target)]], dtype=torch.float64)
    w = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    optimizer = _optimizer(w, lr, momentum, projection, 0.0)
    run = ToyRun("toy2d", method, lr, momentum, 0.0, projection)

    def record() -> None:
        with torch.no_grad():
            cosine = (w / w.norm() * w_star).sum().clamp(-1.0, 1.0)
            run.norms.append(float(w.norm()))
            run.errors.append(math.degrees(math.acos(float(cosine))))
            run.path.append(w.detach().flatten().tolist())

    record()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = -(w / w.norm() * w_star).sum()
        loss.backward()
        optimizer.step()
        record()
    return run


def _angles(w: Tensor) -> tuple[Tensor, Tensor]:
    """Azimuth ``a`` and polar angle ``b`` of a ``[1, 3]`` weight."""
    x, y, z = w[0, 0], w[0, 1], w[0, 2]
    return torch.atan2(y, x), torch.atan2(torch.sqrt(x * x + y * y), z)


def rosenbrock(a: Tensor, b: Tensor) -> Tensor:
    """``(1 − a)² + 100 (b − a²)²``, minimum 0 at ``(1, 1)``."""
    return (1 - a) ** 2 + 100 * (b - a * a) ** 2


def run_toy3d(method: str, *, lr: float, steps: int = TOY3D_STEPS) -> ToyRun:
    """Minimise the Rosenbrock function of ``w``'s angles with one of :data:`TOY3D_METHODS`."""
    projection, wd = TOY3D_METHODS[method]
    a0, b0 = TOY3D_START
    start = [math.sin(b0) * math.cos(a0), math.sin(b0) * math.sin(a0), math.cos(b0)]
    w = torch.tensor([start], dtype=torch.float64, requires_grad=True)
    optimizer = _optimizer(w, lr, TOY3D_MOMENTUM, projection, wd)
    run = ToyRun("toy3d", method, lr, TOY3D_MOMENTUM, wd, projection)

    def record() -> None:
        with torch.no_grad():
            a, b = _angles(w)
            run.norms.append(float(w.norm()))
            run.errors.append(float(rosenbrock(a, b)))
            run.path.append([float(a), float(b)])

    record()
    for _ in range(steps):
        optimizer.zero_grad()
        rosenbrock(*_angles(w)).backward()
        optimizer.step()
        record()
    return run
