"""Name-to-builder registries for the interchangeable parts of a model.

A registry maps a variant name (a string used in configs, run names and tables) to a builder that
returns an ``nn.Module``. Builders of one registry share one signature:

    ATTENTION[name](config: ModelConfig, **options)     -> module, forward(x: (B, T, C), cache=None) -> (B, T, C)
    MLP[name](hidden_size, inter_size, bias, **options) -> module, forward(x: (B, T, C)) -> (B, T, C)
    NORM[name](dim, **options)                          -> module, forward(x: (..., dim)) -> (..., dim)
    POSITION[name](head_dim, max_seq_len, theta)        -> module, forward(q, k, offset=0) -> (q, k)

``options`` come from ``ModelConfig.attention_options``, ``mlp_options`` and ``norm_options``.

A new variant is one class in one file of this package, decorated with ``@ATTENTION.register("name")``
(or MLP, NORM, POSITION). ``variants/__init__.py`` imports every module of the package, so no other
file changes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any


class UnknownVariantError(KeyError, ValueError):
    """Raised for a variant name that is not registered; the message lists the valid names."""

    def __str__(self) -> str:
        # KeyError.__str__ returns the repr of its argument, which quotes the whole message.
        return str(self.args[0])


class Registry(Mapping[str, Callable[..., Any]]):
    """A read-only mapping from variant names to builders, filled by the ``register`` decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register the decorated class or function under ``name``; a taken name raises ValueError."""
        if not name or name != name.strip():
            raise ValueError(f"invalid {self.kind} name {name!r}: expected a non-empty name without spaces")

        def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders:
                raise ValueError(
                    f"{self.kind} name {name!r} is already registered to {self._builders[name]!r}"
                )
            self._builders[name] = builder
            return builder

        return decorator

    def __getitem__(self, name: str) -> Callable[..., Any]:
        try:
            return self._builders[name]
        except KeyError:
            raise UnknownVariantError(
                f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self._builders))}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)

    def option_names(self, name: str) -> set[str] | None:
        """Return the keyword options the builder of ``name`` accepts, or None if it takes any."""
        builder = self[name]
        parameters = inspect.signature(builder).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            return None
        return {p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL}

    def check_options(self, name: str, options: Mapping[str, Any], fixed: tuple[str, ...] = ()) -> None:
        """Raise ValueError if ``options`` has a key that the builder of ``name`` does not accept.

        ``fixed`` lists the positional arguments that the caller supplies itself (such as ``dim``),
        which are not valid option names.
        """
        accepted = self.option_names(name)
        if accepted is None:
            return
        accepted -= set(fixed)
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for {self.kind} {name!r}; "
                f"valid options: {', '.join(sorted(accepted)) or 'none'}"
            )

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, names={sorted(self._builders)})"


ATTENTION = Registry("attention")
MLP = Registry("mlp")
NORM = Registry("norm")
POSITION = Registry("position")
