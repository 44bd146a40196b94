"""Shapes, memory layouts and dtypes: AdamP and SGDP against independent references.

References: the reference package ``adamp==0.3.0`` (``reference.AdamP`` / ``reference.SGDP``),
and ``AlgorithmReference`` below, docs/algorithm.md step by step on plain tensors with the
float64 test-and-project of ``test_projection.py``. The reference package's SGDP projects its
momentum buffer in place when nesterov is off (docs/algorithm.md), so SGDP with momentum and without
nesterov is compared with ``AlgorithmReference`` instead.

Gradients are synthetic: on even steps orthogonal per row to the current weight (so the
projection fires), on odd steps random, each computed from the weight the optimizer holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import adamp as reference
import pytest
import torch
from torch import Tensor

from adampx import SGDP, AdamP
from test_projection import orthogonal_rows, reference_test_and_project

STEPS = 6


# ----------------------------------------------------------------------------- references


class AlgorithmReference:
    """docs/algorithm.md's AdamP or SGDP, literally, in the dtype of the (real) params given."""

    DEFAULTS: ClassVar[dict[type, dict[str, Any]]] = {
        AdamP: dict(betas=(0.9, 0.999), eps=1e-8, weight_decay=0, nesterov=False),
        SGDP: dict(momentum=0, dampening=0, weight_decay=0, nesterov=False, eps=1e-8),
    }

    def __init__(self, params: Sequence[Tensor], optimizer: type, **hyper: Any) -> None:
        self.params, self.optimizer = list(params), optimizer
        self.hp = {"delta": 0.1, "wd_ratio": 0.1, **self.DEFAULTS[optimizer], **hyper}
        self.state: dict[Tensor, dict[str, Any]] = {}

    def _project(self, p: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, float]:
        hp = self.hp
        ref = reference_test_and_project(
            p, g, u, delta=hp["delta"], wd_ratio=hp["wd_ratio"], eps=hp["eps"]
        )
        return ref.u.to(u.dtype).reshape(u.shape), ref.r

    @torch.no_grad()
    def step(self) -> None:
        hp = self.hp
        lr, wd = hp["lr"], hp["weight_decay"]
        for p in self.params:
            g = p.grad
            if self.optimizer is AdamP:
                st = self.state.setdefault(
                    p, {"t": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)}
                )
                beta1, beta2 = hp["betas"]
                st["t"] += 1
                st["m"] = beta1 * st["m"] + (1 - beta1) * g
                st["v"] = beta2 * st["v"] + (1 - beta2) * g * g
                bc1, bc2 = 1 - beta1 ** st["t"], 1 - beta2 ** st["t"]
                denom = st["v"].sqrt() / math.sqrt(bc2) + hp["eps"]
                m = beta1 * st["m"] + (1 - beta1) * g if hp["nesterov"] else st["m"]
                u, r = self._project(p, g, m / denom)
                p.mul_(1 - lr * wd * r)
                p.sub_(lr / bc1 * u)
            else:
                mu, tau = hp["momentum"], hp["dampening"]
                st = self.state.setdefault(p, {"b": torch.zeros_like(p)})
                st["b"] = mu * st["b"] + (1 - tau) * g
                d = g + mu * st["b"] if hp["nesterov"] else st["b"].clone()
                d, r = self._project(p, g, d)
                p.mul_(1 - lr * wd * r / (1 - mu))
                p.sub_(lr * d)


@dataclass(frozen=True)
class Config:
    optimizer: type
    hyper: dict[str, Any]

    def ours(self, params: Sequence[Tensor], foreach: bool, **override: Any):
        return self.optimizer(params, **{**self.hyper, **override}, foreach=foreach)

    @property
    def package_is_faithful(self) -> bool:
        """Whether the reference package computes docs/algorithm.md here: its SGDP projects the
        buffer when nesterov is off, which only matters with momentum."""
        hp = self.hyper
        return self.optimizer is AdamP or hp.get("nesterov") or hp.get("momentum", 0) == 0

    def reference(self, params: Sequence[Tensor], **override: Any):
        """The reference package where it computes docs/algorithm.md, else AlgorithmReference."""
        if not self.package_is_faithful:
            return self.algorithm(params, **override)
        cls = reference.AdamP if self.optimizer is AdamP else reference.SGDP
        return cls(params, **{**self.hyper, **override})

    def algorithm(self, params: Sequence[Tensor], **override: Any) -> AlgorithmReference:
        return AlgorithmReference(params, self.optimizer, **{**self.hyper, **override})


CONFIGS = {
    "adamp": Config(AdamP, dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)),
    "adamp_nesterov": Config(
        AdamP,
        dict(
            lr=2e-2,
            betas=(0.8, 0.9),
            eps=1e-6,
            weight_decay=0.05,
            delta=0.2,
            wd_ratio=0.5,
            nesterov=True,
        ),
    ),
    "sgdp": Config(SGDP, dict(lr=0.05, weight_decay=0.1)),
    "sgdp_nesterov": Config(SGDP, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1)),
    "sgdp_momentum": Config(SGDP, dict(lr=0.05, momentum=0.8, dampening=0.2, weight_decay=0.1)),
}


@pytest.fixture(params=list(CONFIGS))
def config(request) -> Config:
    return CONFIGS[request.param]


@pytest.fixture(params=[False, True], ids=["per_tensor", "multi_tensor"])
def foreach(request) -> bool:
    return request.param


# ----------------------------------------------------------------------------- helpers


def real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def leaf(x: Tensor) -> Tensor:
    """A fresh leaf with the values, dtype and memory layout of ``x``."""
    return x.detach().clone(memory_format=torch.preserve_format).requires_grad_()


def make_grad(
    p: Tensor,
    step: int,
    seed: int,
    *,
    orthogonal: Callable[[int], bool] = lambda step: step % 2 == 0,
    peak: float | None = None,
    contiguous: bool = False,
) -> Tensor:
    """A gradient for ``p``: orthogonal per row of ``p``'s real view when ``orthogonal(step)``,
    else random; scaled to max |g| = ``peak`` if given; in ``p``'s layout unless
    ``contiguous``; in ``p``'s dtype (complex for complex ``p``)."""
    rp = real(p.detach())
    gen = torch.Generator().manual_seed(seed * 7919 + step)
    r = torch.randn(rp.shape, generator=gen, dtype=torch.float64)
    if rp.dim() > 1 and rp.numel() > 0 and orthogonal(step):
        r = orthogonal_rows(rp, r)
    if peak is not None and r.numel() and r.abs().max() > 0:
        r = r * (peak / r.abs().max())
    g = torch.empty_like(
        p, memory_format=torch.contiguous_format if contiguous else torch.preserve_format
    )
    real(g).copy_(r)
    return g


def train(
    optimizers: Sequence[Any],
    params: Sequence[Sequence[Tensor]],
    steps: int = STEPS,
    seed: int = 0,
    **grad_options: Any,
) -> None:
    """Step each optimizer ``steps`` times on its params, every run with its own gradients
    computed from its own current weights (``make_grad``)."""
    for k in range(steps):
        for opt, ps in zip(optimizers, params, strict=True):
            for j, p in enumerate(ps):
                p.grad = make_grad(p, k, seed + j, **grad_options)
            opt.step()


def assert_finite(optimizer: Any, params: Sequence[Tensor]) -> None:
    for p in params:
        assert torch.isfinite(real(p)).all(), f"param {tuple(p.shape)} has inf/NaN"
        for key, value in optimizer.state[p].items():
            if isinstance(value, Tensor):
                assert torch.isfinite(real(value)).all(), f"state {key!r} has inf/NaN"


def moments(optimizer: Any, p: Tensor) -> dict[str, Tensor]:
    return {k: v for k, v in optimizer.state[p].items() if k != "step"}


F64 = dict(rtol=1e-10, atol=1e-12)
SHAPES = [(), (5,), (1, 6), (6, 1), (3, 4, 2), (4, 3, 3, 3), (2, 3, 2, 2, 2)]
EMPTY_SHAPES = [(0,), (0, 3), (3, 0), (2, 0, 3)]


def random(shape: Sequence[int], seed: int, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------- (a) shapes


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shape_matches_reference_float64(shape, config, foreach):
    x = random(shape, seed=len(shape))
    ours, theirs = leaf(x), leaf(x)
    train([config.ours([ours], foreach), config.reference([theirs])], [[ours], [theirs]])
    torch.testing.assert_close(ours, theirs, **F64)
    assert not torch.equal(ours, x), "the param must have moved"


def test_all_shapes_in_one_group(config, foreach):
    """Empty, 0-d, 1-d and 2-d to 5-d params side by side in one group; the reference package
    cannot step an empty param (``view(0, -1)``), so it gets the non-empty ones."""
    xs = [random(s, seed=i) for i, s in enumerate(SHAPES + EMPTY_SHAPES)]
    ours = [leaf(x) for x in xs]
    theirs = [leaf(x) for x in xs if x.numel()]
    opt = config.ours(ours, foreach)
    train([opt, config.reference(theirs)], [ours, theirs])
    torch.testing.assert_close([p for p in ours if p.numel()], theirs, **F64)
    for p, x in zip(ours, xs, strict=True):
        assert p.shape == x.shape
        for value in moments(opt, p).values():
            assert value.shape == p.shape and value.dtype == p.dtype


@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=str)
def test_empty_param_alone(shape, config, foreach):
    p = leaf(torch.zeros(shape))
    opt = config.ours([p], foreach)
    train([opt], [[p]])
    assert p.shape == shape
    for value in moments(opt, p).values():
        assert value.shape == shape


# ----------------------------------------------------------------------------- (b) layouts

LAYOUTS = {
    "channels_last": ((4, 3, 3, 2), lambda x: x.contiguous(memory_format=torch.channels_last)),
    "channels_last_3d": (
        (3, 2, 2, 3, 2),
        lambda x: x.contiguous(memory_format=torch.channels_last_3d),
    ),
    # the layout of torch.randn(5, 7).t(): shape (7, 5), strides (1, 7)
    "transposed": ((7, 5), lambda x: x.t().contiguous().t()),
}
TOLERANCES = {torch.float64: F64, torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: {}}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("grad_contiguous", [False, True], ids=["grad_as_param", "grad_contig"])
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
def test_layout_matches_contiguous_and_is_preserved(
    layout, grad_contiguous, dtype, config, foreach
):
    shape, to_layout = LAYOUTS[layout]
    x = random(shape, seed=3, dtype=dtype)
    strided, plain = leaf(to_layout(x)), leaf(x)
    strides = strided.stride()
    assert strided.is_leaf and not strided.is_contiguous() and plain.is_contiguous()
    opts = [config.ours([strided], foreach), config.ours([plain], foreach)]
    train(opts, [[strided], [plain]], contiguous=grad_contiguous)

    torch.testing.assert_close(strided, plain, **TOLERANCES[dtype])
    assert strided.stride() == strides
    for key, value in moments(opts[0], strided).items():
        assert value.stride() == strides, f"state {key!r} lost the param's layout"
        torch.testing.assert_close(value, opts[1].state[plain][key], **TOLERANCES[dtype])


@pytest.mark.parametrize("ref_cls", [reference.AdamP, reference.SGDP])
def test_reference_package_cannot_step_channels_last(ref_cls):
    """Why the parity tests compare contiguous params: the reference package uses ``.view``."""
    x = random((4, 3, 3, 2), seed=0)
    contiguous, channels_last = leaf(x), leaf(LAYOUTS["channels_last"][1](x))
    for p in (contiguous, channels_last):
        p.grad = make_grad(p, 0, 0)
    ref_cls([contiguous], lr=0.1).step()  # fine in the contiguous layout
    with pytest.raises(RuntimeError, match="view"):
        ref_cls([channels_last], lr=0.1).step()


# ----------------------------------------------------------------------------- (c) half types

HALF_SHAPES = [(6, 5), (4, 3, 2, 2), (5,)]
# relative spacing of representable numbers: two of them cover one rounding flip and its echo
HALF_TOLERANCES = {
    torch.float16: dict(rtol=2 * 2.0**-10, atol=1e-5),
    torch.bfloat16: dict(rtol=2 * 2.0**-7, atol=1e-5),
}
LARGE_GRADIENT = 6e4  # representable in float16 (max 65504); its square is not
LARGE_GRADIENT_LR = {AdamP: 1e-2, SGDP: 1e-6}


def half_case(config: Config, dtype: torch.dtype, peak: float | None):
    xs = [random(s, seed=10 + i).to(dtype) for i, s in enumerate(HALF_SHAPES)]
    override = {} if peak is None else {"lr": LARGE_GRADIENT_LR[config.optimizer]}
    return xs, override


@pytest.mark.parametrize(
    ("dtype", "peak"),
    [(torch.float16, None), (torch.bfloat16, None), (torch.float16, LARGE_GRADIENT)],
    ids=["float16", "bfloat16", "float16_grad_6e4"],
)
def test_half_params_use_float32_state_and_math(dtype, peak, config, foreach):
    """A float16/bfloat16 param steps like a float32 master copy of it (float32 state, float32
    math on the upcast values) that is rounded to the param's dtype after every step."""
    xs, override = half_case(config, dtype, peak)
    ours = [leaf(x) for x in xs]
    # the same optimizer on float32 copies: the same operations, so bit-identical after rounding
    ours32 = [leaf(x.float()) for x in xs]
    # an independent float32 reference, to within a rounding of the half type
    theirs32 = [leaf(x.float()) for x in xs]
    opts = [
        config.ours(ours, foreach, **override),
        config.ours(ours32, foreach, **override),
        config.reference(theirs32, **override),
    ]
    for k in range(STEPS):
        for j, (p, p32, q32) in enumerate(zip(ours, ours32, theirs32, strict=True)):
            p.grad = make_grad(p, k, j, peak=peak)
            p32.grad, q32.grad = p.grad.float(), p.grad.float()
        for opt in opts:
            opt.step()
        with torch.no_grad():
            for p32 in ours32 + theirs32:
                p32.copy_(p32.to(dtype))  # float32 math on the rounded values
        for p, p32, q32 in zip(ours, ours32, theirs32, strict=True):
            assert p.dtype == dtype
            assert torch.equal(p, p32.to(dtype)), f"step {k}: differs from float32 math"
            torch.testing.assert_close(p, q32.to(dtype), **HALF_TOLERANCES[dtype])

    assert_finite(opts[0], ours)
    for p, p32 in zip(ours, ours32, strict=True):
        for key, value in moments(opts[0], p).items():
            assert value.dtype == torch.float32, f"state {key!r} must be float32"
            assert torch.equal(value, opts[1].state[p32][key])


@pytest.mark.parametrize("name", [n for n, c in CONFIGS.items() if c.package_is_faithful])
def test_reference_package_overflows_in_float16(name):
    """The reference package keeps float16 state and squares float16 gradients: with gradients
    of 6e4 its state or params overflow (AdamP's ``exp_avg_sq``; SGDP's buffer and params)."""
    config = CONFIGS[name]
    xs, override = half_case(config, torch.float16, LARGE_GRADIENT)
    theirs = [leaf(x) for x in xs]
    opt = config.reference(theirs, **override)
    assert isinstance(opt, (reference.AdamP, reference.SGDP))
    train([opt], [theirs], peak=LARGE_GRADIENT)
    with pytest.raises(AssertionError, match="inf/NaN"):
        assert_finite(opt, theirs)


# ----------------------------------------------------------------------------- (d) complex


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
@pytest.mark.parametrize("shape", [(4, 3), (3, 2, 2, 2)], ids=str)
def test_complex_weight_equals_its_real_view(dtype, shape, config, foreach):
    """A complex weight of 2 or more dims trains exactly like its real view ``[..., 2]``."""
    c = leaf(torch.randn(shape, generator=torch.Generator().manual_seed(5), dtype=dtype))
    r = leaf(torch.view_as_real(c.detach()))
    opts = [config.ours([c], foreach), config.ours([r], foreach)]
    train(opts, [[c], [r]])
    assert c.dtype == dtype
    assert torch.equal(torch.view_as_real(c.detach()), r)
    for key, value in moments(opts[0], c).items():
        assert value.dtype == dtype
        assert torch.equal(torch.view_as_real(value), opts[1].state[r][key])


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_complex_weight_matches_algorithm_on_real_view(dtype, config, foreach):
    """docs/algorithm.md in float64 on the real view ``[n0, n1, 2]``, rows along dim 0."""
    c = leaf(torch.randn(4, 3, generator=torch.Generator().manual_seed(6), dtype=dtype))
    r = leaf(torch.view_as_real(c.detach()).double())
    train([config.ours([c], foreach), config.algorithm([r])], [[c], [r]])
    tol = F64 if dtype == torch.complex128 else TOLERANCES[torch.float32]
    torch.testing.assert_close(torch.view_as_real(c.detach()).double(), r, **tol)


BIAS_BASELINES = {
    # name: (adampx class, hyperparameters, torch optimizer with the same behaviour unprojected)
    "adamw": (
        AdamP,
        dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
        torch.optim.AdamW,
    ),
    "sgd": (SGDP, dict(lr=0.05, momentum=0.9, nesterov=True), torch.optim.SGD),
}


@pytest.mark.parametrize("baseline", list(BIAS_BASELINES))
@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_complex_bias_is_never_projected(baseline, dtype, foreach):
    """A 1-d complex param is a bias: never tested, even though its real view ``[n, 2]`` is
    2-d and the gradients are orthogonal to it per element (which a 2-d param would project)."""
    cls, hyper, torch_cls = BIAS_BASELINES[baseline]
    x = torch.randn(6, generator=torch.Generator().manual_seed(7), dtype=dtype)
    default, no_projection, torch_ref = leaf(x), leaf(x), leaf(x)
    opts = [
        cls([default], **hyper, foreach=foreach),
        cls([no_projection], **hyper, delta=0.0, foreach=foreach),
        torch_cls([torch_ref], **hyper, foreach=foreach),
    ]
    always = {"orthogonal": lambda step: True}
    train(opts, [[default], [no_projection], [torch_ref]], **always)
    assert torch.equal(default, no_projection)
    torch.testing.assert_close(default, torch_ref)

    # the same values as a real 2-d param are projected: the gradients do trigger the test
    xr = torch.view_as_real(x).clone()
    real_default, real_no_projection = leaf(xr), leaf(xr)
    opts = [
        cls([real_default], **hyper, foreach=foreach),
        cls([real_no_projection], **hyper, delta=0.0, foreach=foreach),
    ]
    train(opts, [[real_default], [real_no_projection]], **always)
    assert not torch.allclose(real_default, real_no_projection)


# ----------------------------------------------------------------------------- (e) zeros

ZERO_SHAPES = [(4, 3, 2, 2), (5, 4), (5,), ()]


@pytest.mark.parametrize("case", ["zero_weights", "zero_grads", "both", "zero_rows"])
def test_zero_weights_and_gradients_stay_finite(case, config, foreach):
    xs = [random(s, seed=20 + i) for i, s in enumerate(ZERO_SHAPES)]
    for x in xs:
        if case in ("zero_weights", "both"):
            x.zero_()
        elif case == "zero_rows" and x.dim() > 1:
            x[::2] = 0
    ours, theirs = [leaf(x) for x in xs], [leaf(x) for x in xs]
    opt = config.ours(ours, foreach)
    peak = 0.0 if case in ("zero_grads", "both") else None
    train([opt, config.reference(theirs)], [ours, theirs], peak=peak)
    assert_finite(opt, ours)
    torch.testing.assert_close(ours, theirs, **F64)
    if case == "both":
        assert not any(p.any() for p in ours)


# ----------------------------------------------------------------------------- (f) mixed dtypes

MIXED = [
    ((4, 3, 3, 3), torch.float32),
    ((6, 5), torch.bfloat16),
    ((5, 4), torch.float64),
    ((5,), torch.float32),
    ((4,), torch.bfloat16),
    ((), torch.float64),
    ((3, 4), torch.float16),
    ((2, 3), torch.bfloat16),
]


def test_mixed_dtypes_multi_tensor_equals_per_tensor(config):
    xs = [random(s, seed=30 + i).to(dtype) for i, (s, dtype) in enumerate(MIXED)]
    multi, single = [leaf(x) for x in xs], [leaf(x) for x in xs]
    opts = [config.ours(multi, foreach=True), config.ours(single, foreach=False)]
    train(opts, [multi, single])
    for p, q, (_, dtype) in zip(multi, single, MIXED, strict=True):
        assert p.dtype == q.dtype == dtype
        tol = F64 if dtype == torch.float64 else {}  # float64 math must stay float64
        torch.testing.assert_close(p, q, **tol)
        for key, value in moments(opts[0], p).items():
            other = opts[1].state[q][key]
            assert value.dtype == other.dtype == torch.promote_types(dtype, torch.float32)
            torch.testing.assert_close(value, other, **tol)
