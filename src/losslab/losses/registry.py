"""The loss registry: one name per loss class, filled at import time by :func:`register_loss`.

``build_loss(name, **params)`` is the one public way to make a loss from a config::

    loss = build_loss("focal", gamma=2.0, alpha=None, class_counts=[300, 100, 50], num_classes=3)

* ``None``-valued params are dropped, so an unset config key keeps the loss's default.
* ``class_counts`` and ``num_classes`` (always passed by the train pipeline) are dropped silently
  when the loss's constructor does not take them.
* Any other param the constructor does not take raises ``TypeError`` naming the loss, the param and
  the accepted params; an unknown name raises :class:`UnknownLossError` listing the known names.
"""

from __future__ import annotations

import fnmatch
import inspect
from typing import Any, TypeVar

__all__ = ["register_loss", "build_loss", "check_loss_params", "list_losses", "get_loss_class", "UnknownLossError",
           "UnknownLossParamError", "AUTO_PARAMS"]

T = TypeVar("T", bound=type)

#: Parameters the pipeline passes to every loss; dropped when a loss does not accept them.
AUTO_PARAMS = ("class_counts", "num_classes")

_loss_registry: dict[str, type] = {}


class UnknownLossError(KeyError):
    """``build_loss`` got a name that is not registered; the message lists the known names."""

    def __str__(self) -> str:  # KeyError's str() would quote the whole message
        return str(self.args[0]) if self.args else ""


class UnknownLossParamError(TypeError):
    """A param the loss's constructor does not take; ``params`` lists them."""

    def __init__(self, message: str, params: list[str] | None = None) -> None:
        super().__init__(message)
        self.params = list(params or [])


def register_loss(arg: type | str | None = None, *, key: str | None = None) -> Any:
    """Class decorator that registers a loss under ``key`` (default: the class's ``name`` or ``__name__``).

    Works bare (``@register_loss``) or with a key (``@register_loss("ce")`` / ``@register_loss(key="ce")``).
    Returns the class unchanged except that ``name`` is set to the key when the class does not define
    one itself. Registering a name twice raises ``ValueError``.
    """

    def _register(cls: T, name: str | None) -> T:
        name = name or cls.__dict__.get("name") or cls.__name__
        if not isinstance(name, str) or not name:
            raise TypeError(f"register_loss: key must be a non-empty str, got {name!r}")
        if name in _loss_registry:
            raise ValueError(
                f"register_loss: loss name {name!r} is already registered to "
                f"{_loss_registry[name].__module__}.{_loss_registry[name].__qualname__}"
            )
        if "name" not in cls.__dict__:
            cls.name = name  # type: ignore[attr-defined]
        _loss_registry[name] = cls
        return cls

    if isinstance(arg, type):
        return _register(arg, key)
    if arg is not None and not isinstance(arg, str):
        raise TypeError(f"register_loss: expected a class or a str key, got {type(arg).__name__}")
    return lambda cls: _register(cls, arg or key)


def list_losses(filter: str = "*") -> list[str]:  # noqa: A002 - timm's name
    """Registered loss names matching the fnmatch pattern ``filter``, sorted (``list_losses("*focal*")``)."""
    return sorted(name for name in _loss_registry if fnmatch.fnmatchcase(name, filter))


def get_loss_class(name: str) -> type:
    """The class registered under ``name``; raises :class:`UnknownLossError` listing the known names."""
    try:
        return _loss_registry[name]
    except (KeyError, TypeError):
        raise UnknownLossError(
            f"unknown loss {name!r}; known losses: {', '.join(sorted(_loss_registry))}"
        ) from None


def accepted_params(cls: type) -> tuple[list[str], bool]:
    """(names of the keyword parameters ``cls.__init__`` takes, whether it takes ``**kwargs``)."""
    sig = inspect.signature(cls.__init__)
    names, var_kw = [], False
    for i, p in enumerate(sig.parameters.values()):
        if i == 0 or p.kind is p.VAR_POSITIONAL:
            continue
        if p.kind is p.VAR_KEYWORD:
            var_kw = True
        else:
            names.append(p.name)
    return names, var_kw


def build_loss(name: str, **params: Any) -> Any:
    """Build the loss registered under ``name`` with ``params`` (``None`` values dropped).

    Raises:
        UnknownLossError: ``name`` is not registered (the message lists the known names).
        TypeError: a param the loss does not take (the message names it and lists the accepted ones).
        ValueError: a bad param value, or ``class_counts`` missing for a loss that needs it
            (raised by the loss's constructor, naming the loss and the param).
    """
    return get_loss_class(name)(**check_loss_params(name, params))


def check_loss_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The params ``build_loss`` would pass to the loss ``name`` (``None`` values and auto params the
    loss does not take dropped), without building it.

    Raises:
        UnknownLossError: ``name`` is not registered.
        UnknownLossParamError: a param the loss does not take (named, with the accepted ones).
    """
    cls = get_loss_class(name)
    params = {k: v for k, v in params.items() if v is not None}
    names, var_kw = accepted_params(cls)
    if not var_kw:
        for auto in AUTO_PARAMS:
            if auto in params and auto not in names:
                params.pop(auto)
        unknown = sorted(set(params) - set(names))
        if unknown:
            raise UnknownLossParamError(
                f"loss {name!r}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                f"accepted parameters: {', '.join(names)}", unknown)
    return params
