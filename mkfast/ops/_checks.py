"""Input checks shared by every op: run once, in the op, before any launch.

Messages name the op, the argument, what was expected and what came, e.g.
``ValueError: topk_dedup: memory must be 2-D (N, d), got shape (4, 3, 8)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(str(dtype).removeprefix("torch.") for dtype in dtypes)


def check_tensor(
    op: str,
    name: str,
    value: object,
    *,
    ndim: int | tuple[int, ...] | None = None,
    layout: str = "",
    dtypes: Iterable[torch.dtype] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Raise TypeError/ValueError unless ``value`` is a tensor of the given rank, dtype, device.

    ``layout`` is the human description of the expected shape, e.g. ``"(B, H, S, D)"``.
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else ndim
        if value.dim() not in allowed:
            ranks = " or ".join(f"{rank}-D" for rank in allowed)
            expected = f"{ranks} {layout}".rstrip()
            raise ValueError(f"{op}: {name} must be {expected}, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            raise TypeError(f"{op}: {name} must be {_dtype_names(dtypes)}, got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{op}: {name} must be on {device} like the other inputs, got {value.device}")
    return value


def check_same_size(op: str, what: str, expected: int, name: str, got: int) -> None:
    if expected != got:
        raise ValueError(f"{op}: {name} must have {what} {expected}, got {got}")


def check_positive_int(op: str, name: str, value: object) -> int:
    """A positive integer (NumPy integers too: a count read from an array is one), returned as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{op}: {name} must be positive, got {value}")
    return int(value)


def check_finite_float(op: str, name: str, value: object) -> float:
    """A real, finite number (bool refused): a NaN or infinite scale would return finite garbage or NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{op}: {name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    return float(value)


def has_values(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s values can be read here: not on the meta device, not under torch.compile
    (the fake implementations see shapes only; value checks are skipped there)."""
    return tensor.device.type != "meta" and not torch.compiler.is_compiling()


def check_int32_values(op: str, name: str, tensor: torch.Tensor) -> None:
    """Refuse int64 values outside int32 (kernels read ids as int32: larger ones would collide).

    A device sync on GPU for int64 input; int32 input costs nothing.
    """
    if tensor.dtype == torch.int32 or tensor.numel() == 0 or not has_values(tensor):
        return
    info = torch.iinfo(torch.int32)
    low, high = int(tensor.min()), int(tensor.max())
    if low < info.min or high > info.max:
        raise ValueError(f"{op}: {name} must fit in int32 [{info.min}, {info.max}], "
                         f"got values in [{low}, {high}]")


def check_no_grad(op: str, hint: str, **tensors: torch.Tensor | None) -> None:
    """Refuse inputs that require grad (with grad mode on) for an op that has no backward, rather than
    return an output that claims requires_grad and fails only at backward()."""
    if not torch.is_grad_enabled():
        return
    needing = [name for name, tensor in tensors.items() if tensor is not None and tensor.requires_grad]
    if needing:
        raise RuntimeError(f"{op}: has no backward, got {', '.join(needing)} with requires_grad=True; "
                           f"call it under torch.no_grad(){hint}")
