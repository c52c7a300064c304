"""Loads the Lua scripts from ``lua/``: inlines ``-- @include "lib/x"`` lines, parses each header
into a :class:`ScriptSpec`, and computes the SHA1 that EVALSHA needs. No I/O to Redis here."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

__all__ = ["Script", "ScriptSpec", "load_all", "lua_dir", "script"]

_INCLUDE = re.compile(r'^-- @include "([\w/]+)"\s*$', re.MULTILINE)
_KEY_LINE = re.compile(r"^\s*KEYS\[(\d+)\]\s*->\s*(\S+)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class ScriptSpec:
    """What a script's header documents: its name and the key patterns of KEYS[1..n]."""

    name: str
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Script:
    """One script: its flattened source (includes inlined) and SHA1."""

    name: str
    source: bytes
    sha: str
    spec: ScriptSpec


def lua_dir() -> Traversable:
    """The folder of .lua files: inside the installed package, or the repository's ``lua/``."""
    packaged = resources.files("qsync") / "lua"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "lua"


def _inline(root: Traversable, text: str, seen: set[str], stack: tuple[str, ...]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in stack:
            raise RuntimeError(f"include cycle: {' -> '.join((*stack, name))}")
        if name in seen:
            return ""
        seen.add(name)
        included = (root / f"{name}.lua").read_text(encoding="utf-8")
        return _inline(root, included, seen, (*stack, name))

    return _INCLUDE.sub(replace, text)


def _parse_spec(name: str, text: str) -> ScriptSpec:
    keys = [(int(i), pattern) for i, pattern in _KEY_LINE.findall(text)]
    if [i for i, _ in keys] != list(range(1, len(keys) + 1)):
        raise RuntimeError(f"lua/{name}.lua: header KEYS must be numbered 1..n in order")
    return ScriptSpec(name=name, keys=tuple(pattern for _, pattern in keys))


def _load(root: Traversable, name: str) -> Script:
    text = (root / f"{name}.lua").read_text(encoding="utf-8")
    flat = _inline(root, text, set(), (name,)).encode()
    return Script(name=name, source=flat, sha=hashlib.sha1(flat).hexdigest(), spec=_parse_spec(name, text))


@cache
def load_all() -> dict[str, Script]:
    """Every top-level script in ``lua/`` by name (helpers in ``lua/lib`` are only included)."""
    root = lua_dir()
    names = sorted(p.name[:-4] for p in root.iterdir() if p.name.endswith(".lua"))
    if not names:
        raise RuntimeError(f"no Lua scripts found in {root}; is the qsync installation complete?")
    return {name: _load(root, name) for name in names}


def script(name: str) -> Script:
    """One script by name."""
    return load_all()[name]
