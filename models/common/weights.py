"""Typed weight trees generated from a parameter table: ``params.text.layers.q_kernel``.

A family declares its weights once, as a table of ``ParamSpec`` rows (HF name, our path,
shape, logical axes, initializer). ``build(table, fn)`` turns the paths into a tree of
``flax.struct`` dataclasses, one class per node (``Weights`` at the root, ``Text``,
``TextLayers``, ``Vision``, ``VisionBlocks``, ``VisionMerger``, ``VisionDeepstack``...),
whose fields are the node's children; ``build(table, fn)`` fills one with ``fn(spec)`` at
every row's path. The same tree shape then carries the weights, their shardings, their
abstract shapes, the optimiser's labels: anything per weight.

Why generated and cached: the classes are pytree nodes, and jit caches, optax states and
orbax targets compare tree definitions, which include the node classes. So a node's class
is a function of its name and field names only (``node_class`` is cached): the same table
gives the same classes, and two tables that differ (a tied ``lm_head``, biases switched
off) give nodes with different fields. An absent row is simply not a field.

Why sorted fields: a node flattens its fields in declaration order, and fields are declared
sorted, the order JAX flattens a dict's keys in. The leaves of a typed tree therefore come
in the order of the nested dicts these trees replace, so every tree reduction (the global
gradient norm, a hash of the weights) sums in the same order as before.

A misspelt weight fails when the code is traced: ``layer.q_kernl`` raises an
AttributeError naming the class and its fields.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence

import flax.struct

ROOT = "Weights"


def class_name(path: Sequence[str]) -> str:
    """The node class name of a path: () -> "Weights", ("text", "layers") -> "TextLayers"."""
    return "".join(part.title().replace("_", "") for part in path) or ROOT


def _missing_weight(self, name: str):
    """Attribute lookup failed: say which weights the node has (a misspelling fails when traced)."""
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(f"{type(self).__name__} has no weight {name!r}; its weights: "
                         f"{', '.join(self.__dataclass_fields__)}")


def _rebuild(name: str, fields: tuple[str, ...], values: tuple):
    return node_class(name, fields)(**dict(zip(fields, values)))


def _reduce(self):
    """Pickle by name and fields: the class is regenerated on load (another process included)."""
    fields = tuple(self.__dataclass_fields__)
    return _rebuild, (type(self).__name__, fields, tuple(getattr(self, f) for f in fields))


@functools.cache
def node_class(name: str, fields: tuple[str, ...]) -> type:
    """The ``flax.struct`` dataclass of one node: ``fields`` (sorted) are pytree children.
    Cached, so the same (name, fields) is always the same class (equal treedefs)."""
    if list(fields) != sorted(fields) or len(set(fields)) != len(fields):
        raise ValueError(f"{name}: fields must be sorted and distinct, got {fields}")
    namespace = {"__annotations__": dict.fromkeys(fields, object), "__module__": __name__,
                 "__qualname__": name, "__getattr__": _missing_weight, "__reduce__": _reduce,
                 "__doc__": f"Weights of node {name}: {', '.join(fields)} (generated from a parameter table)."}
    return flax.struct.dataclass(type(name, (), namespace))


def _structure(paths: Iterable[Sequence[str]]) -> dict:
    """Nested dict of the paths (None at the leaves), checking no path is a prefix of another."""
    root: dict = {}
    for path in paths:
        node = root
        for i, key in enumerate(path[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ValueError(f"path {tuple(path)}: {tuple(path[:i + 1])} is a weight, not a node")
        if path[-1] in node:
            raise ValueError(f"path {tuple(path)} is both a weight and a node")
        node[path[-1]] = None
    return root


def _instantiate(prefix: tuple[str, ...], structure: dict, value_at: Callable[[tuple[str, ...]], object]):
    fields = tuple(sorted(structure))
    values = {key: value_at((*prefix, key)) if sub is None else _instantiate((*prefix, key), sub, value_at)
              for key, sub in structure.items()}
    return node_class(class_name(prefix), fields)(**values)


def build(table: Iterable, fn: Callable) -> object:
    """The typed tree with ``fn(spec)`` at every row's path (rows: anything with ``.path``).
    ``fn`` runs once per row, in table order (the random initialiser splits its keys so)."""
    values = {}
    for spec in table:
        path = tuple(spec.path)
        if path in values:
            raise ValueError(f"path {path} appears twice in the table")
        values[path] = fn(spec)
    return _instantiate((), _structure(values), values.__getitem__)


def leaf(tree, path: Sequence[str]):
    """The value at ``path`` of a typed tree (``leaf(params, ("text", "embed"))`` is
    ``params.text.embed``), for code that walks the table."""
    for key in path:
        tree = getattr(tree, key)
    return tree


def with_fields(tree, **extra):
    """``tree`` (a node) with extra fields, e.g. the reward model's ``reward_head`` beside the
    backbone's ``text`` and ``vision``; the class is generated (and cached) like any node."""
    values = {name: getattr(tree, name) for name in tree.__dataclass_fields__}
    clash = sorted(values.keys() & extra.keys())
    if clash:
        raise ValueError(f"{type(tree).__name__} already has fields {clash}")
    values.update(extra)
    return node_class(type(tree).__name__, tuple(sorted(values)))(**values)


def without_fields(tree, *names: str):
    """``tree`` (a node) without the named fields (the inverse of ``with_fields``)."""
    keep = {name: getattr(tree, name) for name in tree.__dataclass_fields__ if name not in names}
    return node_class(type(tree).__name__, tuple(sorted(keep)))(**keep)
