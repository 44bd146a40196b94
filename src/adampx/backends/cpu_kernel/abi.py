"""The fused kernel's parameter struct as ctypes sees it, and the check that it matches the C one.

``hyper_t`` in ``projected_step.c`` is passed to every kernel call by pointer, so its ctypes
mirror :class:`Hyper` must agree with it field for field: a field added, removed or reordered
on one side only would have the kernel read the wrong numbers without any error. The kernel
exports ``adampx_hyper_layout``, which reports ``sizeof(hyper_t)`` and the offset of each of
its fields; :func:`check_layout` compares them with :class:`Hyper`'s when the library is loaded.
"""

from __future__ import annotations

import ctypes

__all__ = ["Hyper", "check_layout"]


class Hyper(ctypes.Structure):
    """The kernel's ``hyper_t``: one step's parameters, in the C field order.

    ``decay`` is the decay amount ``a`` (``lr·λ`` for AdamP, ``lr·λ/(1−μ)`` for SGDP),
    computed once in Python; the kernel applies ``1 − a·r``. ``momentum`` and ``dampening``
    are SGDP's; ``row_limit`` is the longest row AdamP steps in its per-thread row buffer;
    ``maximize``, ``nesterov`` and ``caution`` are 0 or 1; ``threads`` is the OpenMP thread
    count.
    """

    _fields_ = [
        ("lr", ctypes.c_double),
        ("beta1", ctypes.c_double),
        ("beta2", ctypes.c_double),
        ("eps", ctypes.c_double),
        ("decay", ctypes.c_double),
        ("delta", ctypes.c_double),
        ("wd_ratio", ctypes.c_double),
        ("momentum", ctypes.c_double),
        ("dampening", ctypes.c_double),
        ("row_limit", ctypes.c_int64),
        ("maximize", ctypes.c_int32),
        ("nesterov", ctypes.c_int32),
        ("threads", ctypes.c_int32),
        ("caution", ctypes.c_int32),
    ]


def _python_layout() -> list[tuple[str, int]]:
    """``("sizeof", size)`` then ``(field, offset)`` of :class:`Hyper`, in declaration order:
    the order in which ``adampx_hyper_layout`` reports the C struct."""
    layout: list[tuple[str, int]] = [("sizeof", ctypes.sizeof(Hyper))]
    for entry in Hyper._fields_:
        name = entry[0]
        layout.append((name, getattr(Hyper, name).offset))
    return layout


def _out_of_step(what: str, c_fields: int, python_fields: int) -> RuntimeError:
    """The error for a mismatch ``what``, with the field counts when they differ too."""
    if c_fields != python_fields:
        what += f" (the C struct has {c_fields} fields, abi.Hyper {python_fields})"
    return RuntimeError(
        f"hyper_t layout mismatch: {what}; the kernel source (projected_step.c) and "
        "adampx/backends/cpu_kernel/abi.py are out of step"
    )


def check_layout(library: ctypes.CDLL) -> None:
    """Check that :class:`Hyper` matches the compiled ``hyper_t`` of ``library``.

    Asks the kernel for ``sizeof(hyper_t)`` and its field offsets (``adampx_hyper_layout``)
    and compares them with :class:`Hyper`'s, so that a struct changed on one side only fails
    loudly at load time rather than feeding the kernel wrong parameters. The offsets are
    compared first, in declaration order, so that the error names the first field that moved.

    Raises:
        RuntimeError: the library has no ``adampx_hyper_layout``, or a field offset, the
            size or the number of fields differs from :class:`Hyper`'s (the message names the
            first mismatching field with its Python and C offsets).
    """
    try:
        layout_fn = library.adampx_hyper_layout
    except AttributeError as exc:
        raise RuntimeError(
            f"the fused kernel {library._name} exports no adampx_hyper_layout: the kernel "
            "source (projected_step.c) and adampx/backends/cpu_kernel/abi.py are out of step"
        ) from exc
    layout_fn.restype = ctypes.c_int64
    layout_fn.argtypes = [ctypes.POINTER(ctypes.c_int64), ctypes.c_int64]
    expected = _python_layout()
    capacity = len(expected) + 16  # room to notice fields the C struct has beyond ours
    buffer = (ctypes.c_int64 * capacity)()
    count = min(int(layout_fn(buffer, capacity)), capacity)
    actual = [int(value) for value in buffer[:count]]
    fields = (count - 1, len(expected) - 1)  # C's, Python's
    for index, (name, python_offset) in enumerate(expected[1:], start=1):
        if index >= count:
            raise _out_of_step(f"field {index} {name!r} is missing in C", *fields)
        if actual[index] != python_offset:
            raise _out_of_step(
                f"field {index} {name!r} is at offset {python_offset} in Python (abi.Hyper) "
                f"but {actual[index]} in the compiled kernel",
                *fields,
            )
    if count > len(expected):
        raise _out_of_step("the compiled kernel has fields abi.Hyper lacks", *fields)
    if not actual or actual[0] != expected[0][1]:
        c_size = actual[0] if actual else "unknown"
        raise _out_of_step(
            f"sizeof is {expected[0][1]} in Python (abi.Hyper) but {c_size} in C", *fields
        )
