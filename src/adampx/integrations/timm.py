"""adampx's optimizers in timm's optimizer factory (``timm.optim.create_optimizer_v2``).

:func:`register` adds four entries to timm's registry, beside timm's own ``adamp``,
``sgdp``, ``cadamp`` and ``csgdp``, with the same defaults and flags as those entries::

    import adampx.integrations.timm
    from timm.optim import create_optimizer_v2

    adampx.integrations.timm.register()
    optimizer = create_optimizer_v2(model, "adampx-adamp", lr=1e-3, weight_decay=0.05)

The names use a hyphen: timm reads an optimizer name as ``prefix_name`` (the prefix
``lookahead_`` wraps it in Lookahead), so a name such as ``adampx_adamp`` would resolve to
timm's own ``adamp``. ``lookahead_adampx-adamp`` works as timm's ``lookahead_adamp`` does.

The registry lives in a private module of timm (``timm.optim._optim_factory``); this module
checks that it has what it needs and says so when it does not. Tested with timm 1.0.31.
"""

from __future__ import annotations

from typing import Any

from adampx.adamp import AdamP
from adampx.sgdp import SGDP

__all__ = ["ENTRIES", "register"]

ENTRIES: dict[str, tuple[str, type, dict[str, Any]]] = {
    "adampx-adamp": ("adamp", AdamP, {"wd_ratio": 0.01, "nesterov": True}),
    "adampx-sgdp": ("sgdp", SGDP, {"nesterov": True}),
    "adampx-cadamp": ("cadamp", AdamP, {"wd_ratio": 0.01, "nesterov": True, "caution": True}),
    "adampx-csgdp": ("csgdp", SGDP, {"nesterov": True, "caution": True}),
}
"""Name in timm's registry → (timm's own entry it mirrors, class, the defaults of that entry
in timm 1.0.31). Where the running timm has the entry, its defaults and flags are copied at
:func:`register`, so that ``adampx-X`` is built with the arguments timm's ``X`` would get."""


def _factory() -> Any:
    """timm's registry module, or an ``ImportError`` that says what is missing."""
    try:
        import timm
    except ImportError as exc:
        raise ImportError(
            "adampx.integrations.timm needs timm (pip install timm); it is not installed"
        ) from exc
    try:
        from timm.optim import _optim_factory as factory
    except ImportError as exc:
        raise ImportError(
            f"adampx.integrations.timm needs timm's optimizer registry "
            f"(timm.optim._optim_factory), which timm {timm.__version__} does not have; "
            "tested with timm 1.0.31"
        ) from exc
    missing = [
        name
        for name in ("OptimInfo", "OptimizerRegistry", "default_registry")
        if not hasattr(factory, name)
    ]
    if missing:
        raise ImportError(
            f"adampx.integrations.timm: timm {timm.__version__}'s optimizer factory lacks "
            f"{', '.join(missing)}; tested with timm 1.0.31"
        )
    return factory


def register(registry: Any = None) -> list[str]:
    """Register AdamP and SGDP, plain and cautious, in timm's optimizer registry.

    Args:
        registry: a ``timm.optim.OptimizerRegistry``; by default timm's own, the one that
            ``timm.optim.create_optimizer_v2`` uses.

    Returns:
        The names registered: ``adampx-adamp``, ``adampx-sgdp``, ``adampx-cadamp`` and
        ``adampx-csgdp`` (see :data:`ENTRIES`). Calling it again changes nothing.

    Raises:
        ImportError: timm is missing, or has no optimizer registry.
    """
    factory = _factory()
    registry = factory.default_registry if registry is None else registry
    known = set(registry.list_optimizers())
    for name, (theirs, cls, defaults) in ENTRIES.items():
        if name in known and registry.get_optimizer_info(name).opt_class is cls:
            continue
        flags: dict[str, Any] = {
            "has_betas": cls is AdamP,
            "has_momentum": cls is SGDP,
            "defaults": dict(defaults),
        }
        if theirs in known:  # timm's own entry: the same defaults and flags
            info = registry.get_optimizer_info(theirs)
            flags = {
                "has_eps": info.has_eps,
                "has_betas": info.has_betas,
                "has_momentum": info.has_momentum,
                "defaults": dict(info.defaults or {}),
            }
        registry.register(
            factory.OptimInfo(
                name=name,
                opt_class=cls,
                description=f"adampx.{cls.__name__} with the defaults of timm's {theirs!r}",
                **flags,
            )
        )
    return list(ENTRIES)
