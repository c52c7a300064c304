"""The wheel is complete: built from the repository, installed into a fresh virtualenv (no system
site-packages), qsync imports from outside the repository and loads every Lua script.

Slow (builds a wheel and installs redis-py from PyPI into a new venv): marked ``slow``."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qsync import _scripts

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]

# Run inside the fresh venv, from a temporary folder: report what the installed package sees.
PROBE = r"""
import hashlib, json, sys
from pathlib import Path

import qsync
import qsync.server, qsync.cli, qsync.aio, qsync.client
from qsync import _scripts

scripts = _scripts.load_all()
print(json.dumps({
    "qsync_file": qsync.__file__,
    "version": qsync.__version__,
    "lua_dir": str(_scripts.lua_dir()),
    "typed": (Path(qsync.__file__).parent / "py.typed").is_file(),
    "scripts": {
        name: {
            "size": len(s.source),
            "sha": s.sha,
            "sha_ok": hashlib.sha1(s.source).hexdigest() == s.sha,
            "includes_left": b"@include" in s.source,
            "keys": list(s.spec.keys),
        }
        for name, s in scripts.items()
    },
}))
"""


def _run(args: list[str], *, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "PIP_"))}
    env["PYTHONNOUSERSITE"] = "1"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{args} failed:\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def _repo_lua() -> dict[str, bytes]:
    """lua/*.lua and lua/lib/*.lua of the repository, by path relative to lua/."""
    root = REPO / "lua"
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.lua")}


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qsync-packaging-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def wheel(workdir: Path) -> Path:
    out = workdir / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)], cwd=workdir)
    (built,) = out.glob("qsync-*.whl")
    return built


def test_wheel_holds_every_lua_script(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        packaged = {n.removeprefix("qsync/lua/"): zf.read(n) for n in names if n.startswith("qsync/lua/")}
    expected = _repo_lua()
    assert any(name.startswith("lib/") for name in expected), "the repository has lua/lib helpers"
    missing = sorted(set(expected) - set(packaged))
    assert not missing, f"missing from the wheel: {missing}"
    for name, source in expected.items():
        assert packaged[name] == source, f"qsync/lua/{name} differs from lua/{name}"
    assert "qsync/py.typed" in names
    assert "qsync/__init__.py" in names and "qsync/server/__init__.py" in names
    assert not [n for n in names if n.startswith("tests/") or "__pycache__" in n or n.endswith(".pyc")]


def test_installed_wheel_loads_every_script_from_outside_the_repo(wheel: Path, workdir: Path) -> None:
    venv = workdir / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=workdir)
    python = venv / "bin" / "python"
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg
    _run([str(python), "-m", "pip", "install", "-q", str(wheel)], cwd=workdir)

    run = tempfile.mkdtemp(prefix="cwd-", dir=workdir)
    report: dict[str, Any] = json.loads(_run([str(python), "-I", "-c", PROBE], cwd=Path(run)).stdout)

    installed = Path(report["qsync_file"]).resolve()
    assert installed.is_relative_to(venv.resolve()), f"imported from {installed}, not the fresh venv"
    assert not installed.is_relative_to(REPO)
    assert Path(report["lua_dir"]).resolve().is_relative_to(venv.resolve())
    assert report["typed"]

    top_level = {name.removesuffix(".lua") for name in _repo_lua() if "/" not in name}
    assert set(report["scripts"]) == top_level
    for name, script in report["scripts"].items():
        assert script["size"] > 0, name
        assert script["sha_ok"] and len(script["sha"]) == 40, name
        assert not script["includes_left"], f"{name}: an @include was not inlined"

    # The same scripts, byte for byte, as the repository's lua/ gives now (same SHA1 for EVALSHA).
    for name, script in report["scripts"].items():
        local = _scripts._load(REPO / "lua", name)
        assert script["sha"] == local.sha == hashlib.sha1(local.source).hexdigest(), name
        assert script["keys"] == list(local.spec.keys), name

    help_text = _run([str(venv / "bin" / "qsync"), "--help"], cwd=Path(run), timeout=60).stdout
    assert "worker" in help_text and "enqueue" in help_text
