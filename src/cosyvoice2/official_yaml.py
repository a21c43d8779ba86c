"""Read an official ``cosyvoice2.yaml`` without executing it.

The official file is HyperPyYAML: ``!new:pkg.Class`` builds objects, ``!name:pkg.fn`` binds functions,
``!ref <key>`` refers to other entries (sometimes with arithmetic, ``!ref <chunk_size> * <token_mel_ratio>``)
and ``!apply:`` calls functions at load time (it seeds RNGs). We never import or call anything named in
the file. Instead every tagged node becomes plain data, and the result is flattened into the same shape
as the fixtures' ``config.json``::

    {"flow": {"class": "cosyvoice.flow.flow.CausalMaskedDiffWithXvec", "args": {...}},
     "flow.encoder": {"class": "...UpsampleConformerEncoder", "args": {...}},
     "llm.sampling": {"function": "cosyvoice.utils.common.ras_sampling", "args": {...}},
     "sample_rate": 24000, ...}

A nested ``!new:`` / ``!name:`` object is moved out of its parent's ``args`` into its own dotted key;
``!new:omegaconf.DictConfig`` (used for ``cfm_params``) becomes its plain ``content`` dict.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import ModelLoadError


@dataclass
class _Tagged:
    kind: str  # "new" | "name" | "apply"
    target: str
    args: Any


@dataclass
class _Ref:
    expr: str


class _Loader(yaml.SafeLoader):
    """SafeLoader that turns HyperPyYAML tags into inert placeholders."""


def _construct_tagged(loader: _Loader, suffix: str, node: yaml.Node) -> _Tagged:
    kind, _, target = suffix.partition(":")
    if isinstance(node, yaml.MappingNode):
        args: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        args = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
        args = {} if value in ("", None) else value
    return _Tagged(kind, target, args)


def _construct_ref(loader: _Loader, node: yaml.Node) -> _Ref:
    return _Ref(str(loader.construct_scalar(node)))


for _kind in ("new", "name", "apply"):
    _Loader.add_multi_constructor(f"!{_kind}:", lambda l, s, n, k=_kind: _construct_tagged(l, f"{k}:{s}", n))
_Loader.add_constructor("!ref", _construct_ref)

# PyYAML's YAML 1.1 resolver reads "1e-5" as a string; HyperPyYAML (ruamel) reads it as a float.
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _arith(expr: str) -> Any:
    """Evaluate a literal or + - * / arithmetic on literals; nothing else is allowed."""

    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"unsupported expression {expr!r}")

    return ev(ast.parse(expr, mode="eval"))


def _resolve(value: Any, top: dict, path: str, out: dict, stack: tuple[str, ...] = ()) -> Any:
    """Resolve refs, turn tagged nodes into config entries (registered in ``out``) and return plain data."""
    if isinstance(value, _Ref):
        names = re.findall(r"<([^<>]+)>", value.expr)
        if not names:
            raise ModelLoadError(f"cosyvoice2.yaml: bad !ref {value.expr!r} at {path}")
        resolved = {}
        for name in names:
            if name in stack:
                raise ModelLoadError(f"cosyvoice2.yaml: circular !ref <{name}>")
            if name not in top:
                raise ModelLoadError(f"cosyvoice2.yaml: !ref <{name}> at {path} names no entry")
            resolved[name] = _resolve(top[name], top, name, {}, stack + (name,))
        if re.fullmatch(r"\s*<[^<>]+>\s*", value.expr):
            return resolved[names[0]]
        text = re.sub(r"<([^<>]+)>", lambda m: repr(resolved[m.group(1)]), value.expr)
        try:
            return _arith(text)
        except (ValueError, SyntaxError, TypeError, ZeroDivisionError):
            raise ModelLoadError(f"cosyvoice2.yaml: cannot evaluate !ref {value.expr!r} at {path}") from None
    if isinstance(value, _Tagged):
        if value.kind == "new" and value.target == "omegaconf.DictConfig":
            content = value.args.get("content", {}) if isinstance(value.args, dict) else {}
            return _resolve(content, top, path, out, stack)
        if value.kind == "apply":
            return None  # load-time side effects (seeding): deliberately not run
        args = value.args if isinstance(value.args, dict) else {}
        plain = {}
        for k, v in args.items():
            if isinstance(v, _Tagged) and v.kind in ("new", "name") and v.target != "omegaconf.DictConfig":
                _resolve(v, top, f"{path}.{k}", out, stack)  # registers "<path>.<k>"
            else:
                plain[k] = _resolve(v, top, f"{path}.{k}", out, stack)
        entry = {"class" if value.kind == "new" else "function": value.target, "args": plain}
        out[path] = entry
        return entry
    if isinstance(value, dict):
        return {k: _resolve(v, top, f"{path}.{k}", out, stack) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, top, f"{path}[{i}]", out, stack) for i, v in enumerate(value)]
    return value


def parse_official_yaml(text: str, source: str = "cosyvoice2.yaml") -> dict[str, Any]:
    """Parse the text of an official cosyvoice2.yaml into the flattened config.json format."""
    try:
        top = yaml.load(text, Loader=_Loader)  # noqa: S506 - our loader only builds inert placeholders
    except yaml.YAMLError as e:
        raise ModelLoadError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(top, dict):
        raise ModelLoadError(f"{source}: expected a mapping at the top level")
    out: dict[str, Any] = {}
    for key, value in top.items():
        if key.startswith("__"):
            continue  # __set_seed*: !apply seeding at load time, not configuration
        resolved = _resolve(value, top, key, out)
        if key not in out and not isinstance(value, _Tagged):
            out[key] = resolved
    return out


def load_official_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"missing model config: {path}")
    return parse_official_yaml(path.read_text(encoding="utf-8"), str(path))
