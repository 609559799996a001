"""Optimizer and transform specs in call syntax, parsed without evaluating code.

A *spec* names a registered optimizer or transform and its arguments the way Python would call
it::

    adagrad(lr=0.4, eps=1e-6, eps_in_sqrt=True)
    adam(0.1, betas=(0.9, 0.99))
    adam(lr=0.1, clip=clip_by_moment(k=5))

Grammar (checked on the tree of :func:`ast.parse` in ``eval`` mode; nothing is evaluated)::

    spec      := call | NAME                       # a bare name is a call without arguments
    call      := NAME "(" [value ("," value)*] [NAME "=" value ("," NAME "=" value)*] ")"
    value     := number | "-" number | "+" number | True | False | None | string
               | "(" value, ... ")" | "[" value, ... "]" | call
    number    := an int or float literal (1, 0.4, 1e-6, .5)

``NAME`` is looked up, case-insensitively, in the registry: a top-level spec must name an
optimizer, a nested call (``clip=...``) a transform, which is built at once and passed as the
value. Attributes, subscripts, operators other than a sign, lambdas, comprehensions, ``*``/``**``
unpacking and unregistered names are refused with a :class:`SpecError` whose one-line message
lists what is valid. Keywords are checked against the target's signature
(:func:`inspect.signature`); an optimizer's first parameter (``params``) is supplied by the
caller, so positional values start at ``lr``.

Registry
    Optimizers: ``adagrad``, ``rmsprop``, ``adam``, ``adamw`` (:mod:`steadygrad.optim`) and
    ``sgd`` (``torch.optim.SGD``, plain gradient descent as a baseline). Transforms: the clipping
    factories of :mod:`steadygrad.transforms` named in :data:`TRANSFORM_NAMES`. :func:`register`
    adds more.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "OPTIMIZER",
    "TRANSFORM",
    "TRANSFORM_NAMES",
    "Entry",
    "OptimizerSpec",
    "SpecError",
    "parse_optimizer",
    "parse_transform",
    "register",
    "registry",
]

OPTIMIZER = "optimizer"
TRANSFORM = "transform"

# The clipping transforms a spec may name (the factories of :mod:`steadygrad.transforms`).
TRANSFORM_NAMES: tuple[str, ...] = (
    "clip_by_value",
    "clip_by_norm",
    "clip_by_moment",
    "clip_by_unit_ratio",
    "clip_update_rms",
    "zclip",
    "autoclip",
)

MAX_SPEC_LENGTH = 1000
_VALUES = "numbers, True, False, None, strings, tuples, lists and calls of registered transforms"


class SpecError(ValueError):
    """A spec that cannot be parsed or built. The message is a single line."""


@dataclass(frozen=True)
class Entry:
    """A registered name: ``target`` is called with the spec's arguments (for an optimizer, after
    the parameters)."""

    name: str
    target: Callable[..., Any]
    kind: str

    @property
    def signature(self) -> inspect.Signature | None:
        try:
            return inspect.signature(self.target)
        except (TypeError, ValueError):  # some builtins have none
            return None

    def keywords(self) -> list[str]:
        """The keyword arguments a spec may give (an optimizer's ``params`` excluded)."""
        sig = self.signature
        if sig is None:
            return []
        names = [p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        return names[1:] if self.kind == OPTIMIZER else names

    def accepts_any_keyword(self) -> bool:
        sig = self.signature
        return sig is None or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


_REGISTRY: dict[str, Entry] = {}
_DEFAULTS_LOADED = False


def register(name: str, target: Callable[..., Any], kind: str) -> None:
    """Registers ``target`` under ``name`` (stored lower-case) as an ``OPTIMIZER`` (called as
    ``target(params, ...)``) or a ``TRANSFORM`` (called as ``target(...)``)."""
    if kind not in (OPTIMIZER, TRANSFORM):
        raise ValueError(f"kind must be {OPTIMIZER!r} or {TRANSFORM!r}, got {kind!r}")
    if not name.isidentifier():
        raise ValueError(f"a registered name must be an identifier, got {name!r}")
    _ensure_defaults()
    _REGISTRY[name.lower()] = Entry(name.lower(), target, kind)


def registry(kind: str | None = None) -> dict[str, Entry]:
    """The registered names (of one ``kind``, or all), sorted."""
    _ensure_defaults()
    return {n: e for n, e in sorted(_REGISTRY.items()) if kind is None or e.kind == kind}


def _ensure_defaults() -> None:
    global _DEFAULTS_LOADED
    if _DEFAULTS_LOADED:
        return
    _DEFAULTS_LOADED = True
    import torch

    from ... import optim

    for name, cls in (
        ("adagrad", optim.Adagrad),
        ("rmsprop", optim.RMSprop),
        ("adam", optim.Adam),
        ("adamw", optim.AdamW),
        ("sgd", torch.optim.SGD),
    ):
        _REGISTRY[name] = Entry(name, cls, OPTIMIZER)
    from ... import transforms

    for name in TRANSFORM_NAMES:
        _REGISTRY[name] = Entry(name, getattr(transforms, name), TRANSFORM)


def _names(kind: str) -> str:
    return ", ".join(registry(kind)) or "(none)"


# ---- parsing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimizerSpec:
    """A parsed optimizer spec; :meth:`build` makes the optimizer for some parameters."""

    text: str
    entry: Entry
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.entry.name

    def build(self, params: Iterable[Any]) -> Any:
        """``target(params, *args, **kwargs)``; a value the optimizer refuses raises
        :class:`SpecError`."""
        try:
            return self.entry.target(params, *self.args, **self.kwargs)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"{self.text}: {_one_line(exc)}") from exc


def parse_optimizer(text: str) -> OptimizerSpec:
    """Parses an optimizer spec such as ``"rmsprop(lr=0.4, alpha=0.9)"``.

    Nested transform calls are built here; the optimizer itself is built by
    :meth:`OptimizerSpec.build`. Raises :class:`SpecError`.
    """
    parser = _Parser(text)
    entry, args, kwargs = parser.call(parser.root(), OPTIMIZER)
    return OptimizerSpec(parser.text, entry, args, kwargs)


def parse_transform(text: str) -> Any:
    """Parses and builds a transform spec such as ``"clip_by_norm(max_norm=1.0)"``. Raises
    :class:`SpecError`."""
    parser = _Parser(text)
    node = parser.root()
    entry, args, kwargs = parser.call(node, TRANSFORM)
    return parser.build_transform(node, entry, args, kwargs)


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _describe(node: ast.AST) -> str:
    """A phrase for a refused construct, usable as "<phrase> is not allowed"."""
    phrases = {
        ast.Attribute: "attribute access",
        ast.Subscript: "a subscript",
        ast.Slice: "a slice",
        ast.Lambda: "a lambda",
        ast.BinOp: "arithmetic",
        ast.BoolOp: "a boolean operator",
        ast.UnaryOp: "an operator",
        ast.Compare: "a comparison",
        ast.IfExp: "a conditional expression",
        ast.Dict: "a dict",
        ast.Set: "a set",
        ast.JoinedStr: "an f-string",
        ast.Starred: "* unpacking",
        ast.NamedExpr: "an assignment expression",
        ast.ListComp: "a comprehension",
        ast.SetComp: "a comprehension",
        ast.DictComp: "a comprehension",
        ast.GeneratorExp: "a generator expression",
        ast.Await: "await",
        ast.Yield: "yield",
        ast.YieldFrom: "yield",
    }
    return phrases.get(type(node), f"a {type(node).__name__} expression")


class _Parser:
    def __init__(self, text: Any) -> None:
        if not isinstance(text, str):
            raise SpecError(f"a spec is a string, got {type(text).__name__}")
        self.text = text.strip()
        if not self.text:
            raise SpecError("empty spec; write a call such as adam(lr=0.1)")
        if len(self.text) > MAX_SPEC_LENGTH:
            raise SpecError(f"spec longer than {MAX_SPEC_LENGTH} characters")

    def root(self) -> ast.expr:
        if "\n" in self.text or "\r" in self.text:
            raise SpecError(f"{self.text!r}: a spec is one line")
        try:
            tree = ast.parse(self.text, mode="eval")
        except SyntaxError as exc:
            where = f" at column {exc.offset}" if exc.offset else ""
            raise SpecError(f"cannot parse {self.text!r}: {exc.msg}{where}") from None
        except (ValueError, RecursionError, MemoryError) as exc:
            raise SpecError(f"cannot parse {self.text!r}: {_one_line(exc)}") from None
        return tree.body

    def source(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.text, node) or ast.dump(node)

    def call(self, node: ast.expr, kind: str) -> tuple[Entry, tuple[Any, ...], dict[str, Any]]:
        """Checks a call (or bare name) of a registered ``kind`` and converts its arguments."""
        if isinstance(node, ast.Name):
            return self._lookup(node.id, kind), (), {}
        if not isinstance(node, ast.Call):
            raise SpecError(f"{self.source(node)!r}: expected a call such as {_example(kind)}, got {_describe(node)}")
        func = node.func
        if not isinstance(func, ast.Name):
            what = "attribute access" if isinstance(func, ast.Attribute) else _describe(func)
            raise SpecError(
                f"{self.source(func)!r}: {what} is not allowed; use a registered {kind} name: {_names(kind)}"
            )
        entry = self._lookup(func.id, kind)
        valid = entry.keywords()
        for kw in node.keywords:
            if kw.arg is None:
                raise SpecError(f"{self.source(node)!r}: ** unpacking is not allowed")
            if kw.arg not in valid and not entry.accepts_any_keyword():
                raise SpecError(self._unknown_keyword(entry, kw.arg, valid))
        args = tuple(self.value(a) for a in node.args)
        kwargs = {kw.arg: self.value(kw.value) for kw in node.keywords if kw.arg is not None}
        sig = entry.signature
        if sig is not None:
            leading = (None,) if kind == OPTIMIZER else ()
            try:
                sig.bind(*leading, *args, **kwargs)
            except TypeError as exc:
                raise SpecError(f"{self.source(node)}: {_one_line(exc)}") from None
        return entry, args, kwargs

    def _lookup(self, name: str, kind: str) -> Entry:
        entries = registry()
        entry = entries.get(name.lower())
        if entry is None:
            hint = ""
            if name.lower() in ("true", "false", "none", "null"):
                hint = " (write True, False or None)"
            raise SpecError(f"unknown {kind} {name!r}{hint}; valid {kind}s: {_names(kind)}")
        if entry.kind != kind:
            where = "at the top of a spec" if kind == OPTIMIZER else "as an argument value"
            raise SpecError(
                f"{name!r} is {_a(entry.kind)}, but {_a(kind)} is expected {where}; valid {kind}s: {_names(kind)}"
            )
        return entry

    def _unknown_keyword(self, entry: Entry, name: str, valid: list[str]) -> str:
        listing = ", ".join(valid)
        if entry.kind == OPTIMIZER and name == "params":
            return f"{entry.name}: params is supplied by the command, not the spec; valid keywords: {listing}"
        if entry.kind == OPTIMIZER and name == "clip":
            return (
                f"{entry.name} does not accept clip= "
                f"({_qualname(entry.target)} has no clip option); valid keywords: {listing}"
            )
        return f"unknown keyword {name!r} for {entry.name}; valid keywords: {listing}"

    def value(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            if isinstance(node.value, (bool, int, float, str)) or node.value is None:
                return node.value
            raise SpecError(f"{self.source(node)!r}: {type(node.value).__name__} values are not allowed; use {_VALUES}")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            operand = node.operand
            if (
                isinstance(operand, ast.Constant)
                and isinstance(operand.value, (int, float))
                and not isinstance(operand.value, bool)
            ):
                return -operand.value if isinstance(node.op, ast.USub) else operand.value
            raise SpecError(f"{self.source(node)!r}: a sign is allowed only before a number")
        if isinstance(node, (ast.Tuple, ast.List)):
            items = [self.value(e) for e in node.elts]
            return tuple(items) if isinstance(node, ast.Tuple) else items
        if isinstance(node, (ast.Call, ast.Name)):
            entry, args, kwargs = self.call(node, TRANSFORM)
            return self.build_transform(node, entry, args, kwargs)
        raise SpecError(f"{self.source(node)!r}: {_describe(node)} is not allowed in a spec; use {_VALUES}")

    def build_transform(self, node: ast.expr, entry: Entry, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            return entry.target(*args, **kwargs)
        except (TypeError, ValueError) as exc:
            raise SpecError(f"{self.source(node)}: {_one_line(exc)}") from exc


def _a(kind: str) -> str:
    return f"an {kind}" if kind == OPTIMIZER else f"a {kind}"


def _example(kind: str) -> str:
    return "adam(lr=0.1)" if kind == OPTIMIZER else "clip_by_norm(max_norm=1.0)"


def _qualname(target: Any) -> str:
    module = getattr(target, "__module__", "")
    for public in ("steadygrad.optim", "torch.optim"):
        if module.startswith(public + "."):
            module = public
    return f"{module}.{getattr(target, '__qualname__', repr(target))}"
