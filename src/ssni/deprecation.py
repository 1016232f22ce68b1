"""Renamed public keywords keep working for one release, with a ``DeprecationWarning``."""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, TypeVar

__all__ = ["renamed_keywords", "renamed_attribute"]

F = TypeVar("F", bound=Callable[..., Any])


def renamed_keywords(**renames: str) -> Callable[[F], F]:
    """Decorator: ``old=new`` pairs; a call with ``old=`` warns and passes the value as ``new=``
    (giving both is a ``TypeError``)."""

    def wrap(fn: F) -> F:
        name = fn.__qualname__.replace(".__init__", "")

        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{name}: give {new}= only ({old}= is its old name)")
                    warnings.warn(
                        f"{name}: keyword {old}= is deprecated, use {new}=",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return inner  # type: ignore[return-value]

    return wrap


def renamed_attribute(new: str) -> property:
    """A read/write alias of attribute ``new`` under its old name (no warning: repr and saved
    files still use some old names)."""
    return property(
        lambda self: getattr(self, new),
        lambda self, value: setattr(self, new, value),
        doc=f"Old name of ``{new}``.",
    )
