"""Attribute patches that undo themselves exactly.

Every lever of the speed wing changes an attribute of something it does not own: a module's
``forward``, an entry of a ``ModuleDict``, a function of a modeling module, a config field.
``Patches`` records what was there before each change (the value, or that there was none) and puts
exactly that back, newest first. A patch that something else replaced in the meantime (transformers'
hub kernels re-kernelize a model on ``train()`` / ``eval()``) is left as that other party left it,
and reported, never deleted blindly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

_ABSENT = object()


@dataclass
class _Patch:
    target: Any  # the object, or the mapping an item is set in
    name: str
    before: Any  # _ABSENT: there was none of its own
    value: Any
    item: bool  # a mapping's item, not an attribute
    lever: str


class Patches:
    """Changes to attributes (or mapping items), each undone exactly by ``restore``."""

    def __init__(self) -> None:
        self._done: list[_Patch] = []

    def __len__(self) -> int:
        return len(self._done)

    def attribute(self, target: Any, name: str, value: Any, lever: str = "") -> None:
        """``target.name = value``; ``restore`` puts back ``target``'s own attribute, or its absence.

        An instance attribute is read from ``vars(target)`` (a method the class defines is not the
        instance's own); a property (a config's ``_attn_implementation``) through ``getattr``.
        """
        patch = _Patch(target, name, _ABSENT, value, False, lever)
        patch.before = _current(patch)
        setattr(target, name, value)
        self._done.append(patch)

    def item(self, mapping: MutableMapping, key: str, value: Any, lever: str = "") -> None:
        """``mapping[key] = value``; ``restore`` puts back the item that was there, or its absence."""
        before = mapping[key] if key in mapping else _ABSENT
        mapping[key] = value
        self._done.append(_Patch(mapping, key, before, value, True, lever))

    def restore(self) -> list[str]:
        """Undo every patch, newest first. Returns the levers of patches that were found replaced by
        something else (and left as they were found)."""
        disturbed = []
        while self._done:
            patch = self._done.pop()
            current = _current(patch)
            if current is not patch.value and not (_is_property(patch) and current == patch.value):
                disturbed.append(patch.lever or patch.name)
                continue
            if patch.item:
                if patch.before is _ABSENT:
                    del patch.target[patch.name]
                else:
                    patch.target[patch.name] = patch.before
            elif patch.before is _ABSENT:
                delattr(patch.target, patch.name)
            else:
                setattr(patch.target, patch.name, patch.before)
        return sorted(set(disturbed))


def _is_property(patch: _Patch) -> bool:
    return not patch.item and isinstance(getattr(type(patch.target), patch.name, None), property)


def _current(patch: _Patch) -> Any:
    if patch.item:
        return patch.target[patch.name] if patch.name in patch.target else _ABSENT
    if _is_property(patch):
        return getattr(patch.target, patch.name)
    return vars(patch.target).get(patch.name, _ABSENT)


@contextlib.contextmanager
def patched(apply: Callable[..., int], *args):
    """``apply(*args, patches)`` on entry, ``patches.restore()`` on exit, however the block ends."""
    patches = Patches()
    try:
        apply(*args, patches)
        yield
    finally:
        patches.restore()
