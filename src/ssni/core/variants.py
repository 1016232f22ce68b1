"""Variants of a module that share its sub-networks but own their settings and buffers."""

from __future__ import annotations

import copy
from typing import Any, TypeVar

from torch import nn

__all__ = ["variant"]

M = TypeVar("M", bound=nn.Module)


def variant(module: M, **attributes: Any) -> M:
    """A new module of ``module``'s class with ``attributes`` changed.

    Child modules (score networks, classifiers) are shared, so no weights are copied; the
    variant's own parameter/buffer/child tables and buffers are its own, so converting or moving
    the variant (``.double()``, ``.to(...)``) or changing its settings leaves ``module``'s own
    buffers and settings untouched. (A plain ``copy.copy`` of an ``nn.Module`` shares those tables.)
    """
    new = copy.copy(module)
    new.__dict__["_parameters"] = dict(module._parameters)
    new.__dict__["_buffers"] = {
        k: None if v is None else v.detach().clone() for k, v in module._buffers.items()
    }
    new.__dict__["_modules"] = dict(module._modules)
    for name, value in attributes.items():
        if not hasattr(module, name):
            raise AttributeError(f"{type(module).__name__} has no setting {name!r}")
        setattr(new, name, value)
    return new
