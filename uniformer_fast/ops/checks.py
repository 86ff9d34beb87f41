"""Argument checks shared by the ops: each error names the argument and the expected form."""
from __future__ import annotations

import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_int(v) -> bool:
    """An integer argument (a bool is not one)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_tensor(name: str, t, *, ndim: int, form: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape {form}; got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D of shape {form}; got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64; got {t.dtype}")


def check_like(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}); got {t.dtype}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}); got {t.device}")


def check_optional_vector(name: str, t, n: int, ref_name: str, ref: torch.Tensor) -> None:
    """A bias-like argument: None, or a 1-D float tensor of n elements with ref's dtype and device."""
    if t is None:
        return
    check_tensor(name, t, ndim=1, form=f"({n},)")
    if t.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},); got {tuple(t.shape)}")
    check_like(name, t, ref_name, ref)
