"""The broadcastable-dict round trip that every input and output crossing a process boundary has.

A frozen dataclass that mixes in `TensorDictMixin` turns into a flat dict of its own fields (tensors
and plain values) and back. Nested dataclasses of the same kind are flattened with a `field.` prefix,
so each class states its own schema; nothing depends on the order of keys.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Any

from typing_extensions import Self

class TensorDictMixin:
    """For frozen dataclasses whose fields are tensors, plain values, or such dataclasses."""

    def as_broadcastable_tensor_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            if isinstance(value, TensorDictMixin):
                for key, inner in value.as_broadcastable_tensor_dict().items():
                    out[f"{field.name}.{key}"] = inner
                out[f"{field.name}."] = type(value).__qualname__  # marks a present nested value
            else:
                out[field.name] = value
        return out

    @classmethod
    def from_broadcasted_tensor_dict(cls, tensor_dict: dict[str, Any]) -> Self:
        kwargs: dict[str, Any] = {}
        hints = _nested_types(cls)
        for field in dataclasses.fields(cls):  # type: ignore[arg-type]
            nested = hints.get(field.name)
            if nested is not None and f"{field.name}." in tensor_dict:
                prefix = f"{field.name}."
                inner = {k[len(prefix) :]: v for k, v in tensor_dict.items() if k.startswith(prefix) and k != prefix}
                kwargs[field.name] = nested.from_broadcasted_tensor_dict(inner)
            elif field.name in tensor_dict:
                kwargs[field.name] = tensor_dict[field.name]
            elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise KeyError(f"{cls.__name__}: field {field.name!r} is missing from the received dict")
        return cls(**kwargs)


@functools.cache
def _nested_types(cls: type) -> dict[str, type[TensorDictMixin]]:
    """Fields declared with a TensorDictMixin type (optionally `| None`), by name."""
    nested: dict[str, type[TensorDictMixin]] = {}
    for name, hint in typing.get_type_hints(cls).items():
        for candidate in typing.get_args(hint) or (hint,):
            if isinstance(candidate, type) and issubclass(candidate, TensorDictMixin):
                nested[name] = candidate
    return nested
