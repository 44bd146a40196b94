"""``adampx.algorithm.projection.project_`` against a literal float64 reading of docs/algorithm.md.

The reference below is written the obvious way (reshape views, ``F.cosine_similarity``, a
Python ``if`` per view, a loop over rows) and shares no code with the library. Gradients are
built so that the test is known to pass in the channel view (orthogonal per row), only in the
layer view (orthogonal only as a whole), or neither (random), and every case is compared with
the reference and checked against the properties docs/algorithm.md states.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, event, given
from hypothesis import strategies as st
from torch import Tensor

from adampx.algorithm.projection import is_projectable, project_

VIEWS = (
    ("channel", lambda x: x.reshape(x.shape[0], -1)),
    ("layer", lambda x: x.reshape(1, -1)),
)


def channel_view(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


# ----------------------------------------------------------------------------- reference


class Reference(NamedTuple):
    u: Tensor  # projected update (float64, contiguous)
    r: float  # weight-decay multiplier
    view: str | None  # "channel", "layer" or None
    cosines: dict[str, float]  # max |cos| of every view tried
    margin: float  # smallest relative distance of a tried view's max |cos| to its threshold


def reference_test_and_project(
    p: Tensor, g: Tensor, u: Tensor, *, delta: float, wd_ratio: float, eps: float
) -> Reference:
    """docs/algorithm.md's test-and-project, literally, in float64 (inputs are not modified)."""
    p, g = p.detach().double(), g.detach().double()
    u = u.detach().double().contiguous().clone()
    cosines: dict[str, float] = {}
    margin = math.inf
    if p.dim() <= 1:
        return Reference(u, 1.0, None, cosines, margin)
    for name, view in VIEWS:
        cos = F.cosine_similarity(view(g), view(p), dim=1, eps=eps).abs()
        max_cos = cos.max().item()
        threshold = delta / math.sqrt(view(p).shape[1])
        cosines[name] = max_cos
        if threshold > 0:
            margin = min(margin, abs(max_cos - threshold) / threshold)
        if max_cos < threshold:
            p_rows, u_rows = view(p), view(u).clone()
            for i in range(p_rows.shape[0]):
                p_hat = p_rows[i] / (p_rows[i].norm() + eps)
                u_rows[i] = u_rows[i] - p_hat * torch.dot(p_hat, u_rows[i])
            return Reference(u_rows.reshape(u.shape), wd_ratio, name, cosines, margin)
    return Reference(u, 1.0, None, cosines, margin)


# ----------------------------------------------------------------------------- inputs


def orthogonal_rows(p: Tensor, r: Tensor) -> Tensor:
    """``r`` minus its component along ``p`` in every row of the channel view.

    Rows of length 1 can only be orthogonal to a nonzero weight by being zero, so they are
    set to exactly zero (a rounding residue would have |cos| = 1).
    """
    p_rows, r_rows = channel_view(p.double()), channel_view(r.double())
    if p_rows.shape[1] == 1:
        return torch.zeros(p.shape, dtype=torch.float64)
    pp = (p_rows * p_rows).sum(1, keepdim=True)
    coef = torch.where(pp > 0, (p_rows * r_rows).sum(1, keepdim=True) / pp.clamp_min(1e-300), 0)
    return (r_rows - coef * p_rows).reshape(p.shape)


def orthogonal_as_a_whole(p: Tensor, r: Tensor) -> Tensor:
    """A gradient orthogonal to ``p`` as a whole whose rows 0 and 1 are parallel to ``p``.

    Row 0 is ``+p_0 / ‖p_0‖²`` and row 1 is ``-p_1 / ‖p_1‖²``, so their dot products with ``p``
    cancel (+1 and -1) while both have |cos| = 1; the other rows are orthogonal per row. Needs
    two rows and nonzero rows 0 and 1.
    """
    g = channel_view(orthogonal_rows(p, r)).clone()
    p_rows = channel_view(p.double())
    g[0] = p_rows[0] / p_rows[0].square().sum()
    g[1] = -p_rows[1] / p_rows[1].square().sum()
    return g.reshape(p.shape)


def in_layout(x: Tensor, perm: tuple[int, ...] | None, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype``, stored with its dims in memory order ``perm`` (None: contiguous)."""
    if perm is None:
        return x.to(dtype).contiguous()
    storage = torch.empty([x.shape[d] for d in perm], dtype=dtype)
    inverse = sorted(range(len(perm)), key=perm.__getitem__)
    out = storage.permute(inverse)
    out.copy_(x)
    return out


shapes = st.one_of(
    st.lists(st.integers(1, 4), min_size=2, max_size=5).map(tuple),
    st.integers(2, 12).map(lambda n: (1, n)),
    st.integers(2, 12).map(lambda n: (n, 1)),
)
# delta < 1: the channel test of a row that is parallel to p (|cos| = 1) fails in every view.
deltas = st.one_of(st.floats(0.005, 0.95), st.sampled_from([0.0, 1.0, 2.0, 10.0]))
wd_ratios = st.floats(0.0, 1.0)
epsilons = st.sampled_from([1e-8, 1e-12, 1e-4])


@st.composite
def layouts(draw: st.DrawFn, ndim: int) -> tuple[int, ...] | None:
    if not draw(st.booleans()):
        return None
    return tuple(draw(st.permutations(range(ndim))))


def expected_view(kind: str, shape: tuple[int, ...], delta: float) -> str | bool | None:
    """Which view must fire by construction; False where the construction says nothing."""
    if delta == 0:
        return None  # |cos| < 0 is impossible
    if kind == "channel":
        return "channel"  # orthogonal rows pass the channel view for every delta > 0
    if kind == "layer" and delta < 1:
        # with one row the layer view is the channel view
        return "layer" if shape[0] >= 2 else "channel"
    return False


def make_gradient(kind: str, p: Tensor, r: Tensor) -> Tensor:
    if kind == "channel":
        return orthogonal_rows(p, r)
    if kind == "layer":
        return orthogonal_as_a_whole(p, r) if p.shape[0] >= 2 else orthogonal_rows(p, r)
    return r


# ----------------------------------------------------------------------------- checks

TOLERANCES = {torch.float64: 1e-10, torch.float32: 2e-5}


def run_project(p: Tensor, g: Tensor, u: Tensor, **hyper: float):
    """``project_`` on copies, checking that ``p`` and ``g`` are left exactly as they were."""
    p_before, g_before = p.clone(), g.clone()
    strides = (p.stride(), g.stride(), u.stride())
    u_out = u.clone(memory_format=torch.preserve_format)
    r, decision = project_(p, g, u_out, **hyper)
    assert torch.equal(p, p_before) and torch.equal(g, g_before), "project_ modified p or g"
    assert (p.stride(), g.stride(), u_out.stride()) == strides
    return u_out, r, decision


def fired_view(decision) -> str | None:
    channel, layer = bool(decision.channel), bool(decision.layer)
    assert not (channel and layer), "channel and layer must be mutually exclusive"
    return "channel" if channel else "layer" if layer else None


def assert_orthogonal_in_view(p: Tensor, u_before: Tensor, u_after: Tensor, view, eps: float):
    """Every row of ``u_after`` is orthogonal to the same row of ``p`` in ``view``.

    ``p̂ = p / (‖p‖ + eps)`` leaves a residue ``p·u · (1 − ‖p‖² / (‖p‖ + eps)²)``, bounded by
    ``‖p‖ ‖u‖ · 2 eps / ‖p‖``; rounding adds a relative ``tol``.
    """
    tol = TOLERANCES[u_after.dtype]
    p_rows, u0_rows, u_rows = view(p.double()), view(u_before.double()), view(u_after.double())
    p_norm, u0_norm = p_rows.norm(dim=1), u0_rows.norm(dim=1)
    dots = (p_rows * u_rows).sum(1).abs()
    bound = p_norm * u0_norm * (2 * eps / p_norm.clamp_min(1e-300) + tol)
    assert bool((dots <= bound).all()), f"rows not orthogonal: {dots} > {bound}"


def check_against_reference(p: Tensor, g: Tensor, u: Tensor, *, delta, wd_ratio, eps):
    """Compare ``project_`` with the reference and check the stated properties."""
    ref = reference_test_and_project(p, g, u, delta=delta, wd_ratio=wd_ratio, eps=eps)
    tol = TOLERANCES[u.dtype]
    # a decision within rounding of the threshold may flip (docs/algorithm.md): leave those out
    assume(ref.margin > (1e-9 if u.dtype == torch.float64 else 1e-4))
    u_out, r, decision = run_project(p, g, u, delta=delta, wd_ratio=wd_ratio, eps=eps)

    view = fired_view(decision)
    assert view == ref.view
    assert r.dtype == u.dtype and r.shape == ()
    expected_r = torch.tensor(wd_ratio if view else 1.0, dtype=u.dtype)
    assert torch.equal(r, expected_r)
    assert bool(decision.fired) == (view is not None)

    torch.testing.assert_close(
        decision.max_cosine_channel.double(),
        torch.tensor(ref.cosines["channel"], dtype=torch.float64),
        rtol=tol,
        atol=tol,
    )
    if "layer" in ref.cosines:
        torch.testing.assert_close(
            decision.cosine_layer.double(),
            torch.tensor(ref.cosines["layer"], dtype=torch.float64),
            rtol=tol,
            atol=tol,
        )

    assert torch.isfinite(u_out).all() and torch.isfinite(r)
    scale = u.double().abs().max().item()
    torch.testing.assert_close(u_out.double(), ref.u, rtol=tol, atol=tol * scale)
    if view is None:
        assert torch.equal(u_out, u), "an update that is not projected must stay bit-identical"
    else:
        assert_orthogonal_in_view(p, u, u_out, dict(VIEWS)[view], eps)
    return view, decision, u_out


# ----------------------------------------------------------------------------- tests


@given(
    shape=shapes,
    kind=st.sampled_from(["channel", "layer", "random"]),
    delta=deltas,
    wd_ratio=wd_ratios,
    eps=epsilons,
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_project_matches_reference(shape, kind, delta, wd_ratio, eps, dtype, seed, data):
    gen = torch.Generator().manual_seed(seed)
    p64 = torch.randn(shape, generator=gen, dtype=torch.float64)
    r64 = torch.randn(shape, generator=gen, dtype=torch.float64)
    u64 = torch.randn(shape, generator=gen, dtype=torch.float64)
    g64 = make_gradient(kind, p64, r64)
    perm = data.draw(layouts(len(shape)))
    p, g, u = (in_layout(x, perm, dtype) for x in (p64, g64, u64))

    view, decision, _ = check_against_reference(p, g, u, delta=delta, wd_ratio=wd_ratio, eps=eps)

    event(f"{kind} gradient: {view} view fired")
    expected = expected_view(kind, shape, delta)
    if expected is not False:
        assert view == expected
    if kind == "channel" and delta > 0:
        # both views pass (orthogonal per row implies orthogonal as a whole): channel wins
        n = math.prod(shape)
        assert float(decision.cosine_layer) < delta / math.sqrt(n)
        assert not bool(decision.layer)


@given(
    shape=shapes,
    zero=st.sets(st.sampled_from(["p", "g", "u"]), max_size=3),
    zero_rows=st.sets(st.integers(0, 3), max_size=4),
    delta=deltas,
    wd_ratio=wd_ratios,
    eps=epsilons,
    seed=st.integers(0, 2**16),
)
def test_zeros_never_give_nan(shape, zero, zero_rows, delta, wd_ratio, eps, seed):
    """Zero weights, gradients, updates and rows: finite results equal to the reference."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(shape, generator=gen, dtype=torch.float64) for k in "pgu"}
    for k in zero:
        tensors[k].zero_()
    rows = [i for i in zero_rows if i < shape[0]]
    tensors["p"][rows] = 0
    tensors["g"][rows[::2]] = 0
    p, g, u = tensors["p"], tensors["g"], tensors["u"]

    view, _, u_out = check_against_reference(p, g, u, delta=delta, wd_ratio=wd_ratio, eps=eps)

    if "g" in zero or "p" in zero:
        # every cosine is 0: the channel view passes for any delta > 0
        assert view == ("channel" if delta > 0 else None)
    # p̂ = 0 on a zero row of p, in either view: that row of u is untouched
    untouched = slice(None) if "p" in zero else rows
    assert torch.equal(u_out[untouched], u[untouched])
    if "u" in zero:
        assert not u_out.any()


@pytest.mark.parametrize("delta", [0.1, 1.0])
def test_zero_gradient_projects_in_channel_view(delta):
    """A zero gradient gives c = 0: the channel view passes and u loses its radial part."""
    p = torch.tensor([[3.0, 4.0], [0.0, 2.0]], dtype=torch.float64)
    u = torch.tensor([[3.0, 4.0], [1.0, 1.0]], dtype=torch.float64)
    u_out, r, decision = run_project(
        p, torch.zeros_like(p), u, delta=delta, wd_ratio=0.25, eps=1e-12
    )
    assert bool(decision.channel) and not bool(decision.layer)
    assert float(r) == 0.25
    # row 0: u is parallel to p, nothing is left; row 1: only the first coordinate is left
    torch.testing.assert_close(u_out, torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64))


def test_delta_zero_never_projects():
    p = torch.randn(3, 4, dtype=torch.float64)
    g = torch.zeros_like(p)  # |cos| = 0, the smallest possible; still not < 0
    u = torch.randn(3, 4, dtype=torch.float64)
    u_out, r, decision = run_project(p, g, u, delta=0.0, wd_ratio=0.1, eps=1e-8)
    assert not bool(decision.fired)
    assert float(r) == 1.0
    assert torch.equal(u_out, u)


@pytest.mark.parametrize(
    ("tensor", "expected"),
    [
        (torch.tensor(1.0), False),
        (torch.zeros(5), False),
        (torch.zeros(0, 3), False),
        (torch.zeros(3, 0, 2), False),
        (torch.zeros(1, 5), True),
        (torch.zeros(5, 1), True),
        (torch.zeros(2, 3, 4, 5, 6), True),
        (torch.zeros(5, dtype=torch.complex64), False),
        (torch.zeros(2, 3, dtype=torch.complex64), True),
    ],
)
def test_is_projectable(tensor, expected):
    assert is_projectable(tensor) is expected
