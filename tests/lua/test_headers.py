"""Each script's header (lua/README.md) against the code: every top-level ``lua/*.lua`` opens
with a comment block giving its purpose, one ``KEYS[i] ->`` line per key, its ``ARGV``, the
``Derived keys`` it builds from a declared prefix, ``Returns`` (every code) and its state change.
The keys and arguments that ``qsync/_ops.py`` passes must match the header in number, order and
name; the codes the body returns must be documented; the body must not read a KEYS or ARGV
slot the header does not declare. No Redis is needed here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

import qsync
from qsync import _ops, _scripts
from qsync._keys import keys_for
from qsync.errors import Code

K = keys_for("hp", "hq")
TAG_PATTERN = "{<prefix>:<queue>}"
LEASES = [qsync.Lease("ID-1", "tok-1"), qsync.Lease("ID-2", "tok-2")]

# One call per script, as qsync builds it, with two items where a script takes a batch (the
# second enqueued task has a unique lock, the first none).
BUILDERS: dict[str, Callable[[], _ops.Call[Any]]] = {
    "enqueue": lambda: _ops.enqueue_many(
        K,
        [
            qsync.Task("job", b"x", task_id="ID-1"),
            qsync.Task("job", b"y", task_id="ID-2", unique=60, unique_key="UK"),
        ],
    )[0],
    "info": lambda: _ops.info(K, "ID-1"),
    "lease": lambda: _ops.lease(K, 2, 1000),
    "extend": lambda: _ops.extend(K, LEASES, 1000),
    "ack": lambda: _ops.ack(K, LEASES),
    "fail": lambda: _ops.fail(K, [qsync.Failure(x.id, x.token, "err", 5) for x in LEASES]),
    "requeue": lambda: _ops.requeue(K, LEASES),
    "promote": lambda: _ops.promote(K, 10),
    "recover": lambda: _ops.recover(K, 10, 5, 0),
    "trim": lambda: _ops.trim(K, 10, 1000, 10),
    "resume": lambda: _ops.pause(K, False),
    "unblock": lambda: _ops.unblock(K, "L1"),
}
BATCH_ITEMS = 2


def lua_root() -> Any:
    return _scripts.lua_dir()


def script_names() -> list[str]:
    return sorted(p.name[:-4] for p in lua_root().iterdir() if p.name.endswith(".lua"))


@dataclass
class Header:
    name: str
    text: str  # the comment block, without --[[ and ]]
    body: str  # the code after it
    keys: list[str]  # KEYS[1..n] patterns
    variadic_keys: list[str]  # patterns of KEYS[n+1..] (per item), if any
    argv: list[int]  # fixed ARGV indexes
    argv_start: int | None  # first index of the repeated groups, if any
    argv_groups: list[tuple[str, int]]  # each repeated group in order: (item, fields per item)

    def section(self, title: str) -> str:
        """The text from ``title`` to the next blank-line-separated section."""
        match = re.search(rf"^\s*{re.escape(title)}.*?(?=\n\s*\n|\Z)", self.text, re.MULTILINE | re.DOTALL)
        assert match, f"lua/{self.name}.lua: header has no {title!r} section"
        return match.group(0)


_FIXED_KEY = re.compile(r"^\s*KEYS\[(\d+)\]\s*->\s*(\S+)", re.MULTILINE)
_VARIADIC_KEY = re.compile(r"^\s*KEYS\[(\d+)\.\.\]\s*->.*\n((?:\s+\{<prefix>.*\n)+)", re.MULTILINE)
_FIXED_ARG = re.compile(r"^\s*ARGV\[(\d+)\]\s*->", re.MULTILINE)
_VARIADIC_ARG = re.compile(r"^\s*ARGV\[(\d+)\.\.\]\s*->\s*(.*)$", re.MULTILINE)
_PER_ITEM = re.compile(r"(\d+) fields per (task|profile)")
_OFFSET = re.compile(r"(?<![\w\]])\+(\d+) ")


def parse(name: str) -> Header:
    source = (lua_root() / f"{name}.lua").read_text(encoding="utf-8")
    assert source.startswith("--[["), f"lua/{name}.lua must open with its --[[ header ]]"
    text, sep, body = source[4:].partition("]]")
    assert sep, f"lua/{name}.lua: the header is never closed with ]]"

    fixed = [(int(i), pattern) for i, pattern in _FIXED_KEY.findall(text)]
    assert [i for i, _ in fixed] == list(range(1, len(fixed) + 1)), (
        f"lua/{name}.lua: KEYS lines must be numbered 1..n"
    )
    variadic_keys: list[str] = []
    for start, block in _VARIADIC_KEY.findall(text):
        assert int(start) == len(fixed) + 1, f"lua/{name}.lua: KEYS[{start}..] must follow KEYS[{len(fixed)}]"
        variadic_keys = [line.split()[0] for line in block.splitlines() if line.strip()]

    argv = sorted(int(i) for i in _FIXED_ARG.findall(text))
    assert argv == list(range(1, len(argv) + 1)), f"lua/{name}.lua: ARGV lines must be numbered 1..n"
    argv_start = None
    groups: list[tuple[str, int]] = []
    for start, rest in _VARIADIC_ARG.findall(text):
        argv_start = int(start)
        if rest.startswith("pairs"):
            groups = [("item", 2)]
    argv_block = re.search(r"^\s*ARGV.*?(?=\n\s*\n|\Z)", text, re.MULTILINE | re.DOTALL)
    if not groups and argv_block:  # "ARGV[3..] -> 9 fields per profile j ...; then 4 fields per task i"
        groups = [(item, int(stride)) for stride, item in _PER_ITEM.findall(argv_block.group(0))]
        if groups and argv_start is None:
            argv_start = len(argv) + 1
    return Header(name, text, body, [p for _, p in fixed], variadic_keys, argv, argv_start, groups)


def pattern_of(key: str) -> str:
    """A key qsync builds, written the way the headers write it."""
    assert K.owns(key), key
    rest = key[len(K.tag) :]
    if rest.startswith(":t:") and rest != ":t:":
        rest = ":t:<id>"
    elif rest.startswith(":u:") and rest != ":u:":
        rest = ":u:<key>"
    elif rest.startswith(":wake:"):
        rest = ":wake:<listener>"
    return TAG_PATTERN + rest


def test_every_script_is_covered() -> None:
    names = script_names()
    assert names == sorted(_scripts.load_all()), "qsync/_scripts.py loads every lua/*.lua (not lib/)"
    assert names == sorted(BUILDERS), (
        "each script needs a builder here (the call qsync/_ops.py makes for it), so that its "
        "header is checked against the keys qsync passes"
    )


@pytest.mark.parametrize("name", script_names())
def test_header_has_every_section(name: str) -> None:
    h = parse(name)
    purpose = h.text.strip().splitlines()[0]
    assert re.match(rf"{name}: \S", purpose), f"lua/{name}.lua: the header opens with '{name}: <purpose>'"
    assert h.keys, f"lua/{name}.lua: no 'KEYS[i] ->' lines"
    assert re.search(r"^\s*ARGV\b", h.text, re.MULTILINE), f"lua/{name}.lua: no ARGV line"
    h.section("Returns")
    h.section("State change:")
    for pattern in h.keys + h.variadic_keys:
        assert pattern.startswith(TAG_PATTERN), f"lua/{name}.lua: {pattern} lacks the queue's hash tag"
    if any(p.endswith(":") for p in h.keys):
        derived = h.section("Derived keys:")
        assert "same hash tag" in derived or "carry the queue's hash tag" in derived, derived


@pytest.mark.parametrize("name", script_names())
def test_header_keys_match_the_keys_qsync_passes(name: str) -> None:
    h = parse(name)
    call = BUILDERS[name]()
    assert call.script is not None and call.script.name == name
    passed = [pattern_of(k) for k in call.keys]

    assert passed[: len(h.keys)] == h.keys, f"lua/{name}.lua: KEYS in the header vs qsync/_ops.py"
    extra = passed[len(h.keys) :]
    if not h.variadic_keys:
        assert extra == [], f"lua/{name}.lua: qsync passes {len(extra)} keys the header does not list"
        return
    # Per item: the first variadic pattern, then optionally the others, in the header's order.
    assert extra, f"lua/{name}.lua: the header lists per-item keys but qsync passes none"
    items: list[list[str]] = []
    for pattern in extra:
        assert pattern in h.variadic_keys, f"lua/{name}.lua: {pattern} is not in the header"
        if pattern == h.variadic_keys[0]:
            items.append([pattern])
        else:
            assert items, f"lua/{name}.lua: {pattern} before any {h.variadic_keys[0]}"
            items[-1].append(pattern)
    assert len(items) == BATCH_ITEMS
    for item in items:
        assert item == h.variadic_keys[: len(item)], item


def test_parser_of_qsync_agrees_with_the_headers() -> None:
    for name in script_names():
        assert list(_scripts.script(name).spec.keys) == parse(name).keys, name


@pytest.mark.parametrize("name", script_names())
def test_header_argv_matches_the_arguments_qsync_passes(name: str) -> None:
    h = parse(name)
    args = BUILDERS[name]().args
    if h.argv_start is None:
        if re.search(r"^\s*ARGV: none", h.text, re.MULTILINE):
            assert args == (), f"lua/{name}.lua: ARGV: none, but qsync passes {len(args)}"
        else:
            assert len(args) == len(h.argv), f"lua/{name}.lua: ARGV in the header vs qsync/_ops.py"
        return
    assert h.argv_start == len(h.argv) + 1, f"lua/{name}.lua: the repeated ARGV must follow the fixed ones"
    # Items per group: the tasks, and for enqueue the profiles it names in ARGV[2].
    counts = {"item": BATCH_ITEMS, "task": BATCH_ITEMS, "profile": args[1] if name == "enqueue" else 0}
    expected = sum(counts[item] * stride for item, stride in h.argv_groups)
    assert len(args) - len(h.argv) == expected, (
        f"lua/{name}.lua: the header's repeated ARGV ({h.argv_groups}) make {expected} for "
        f"{BATCH_ITEMS} items, but qsync passes {len(args) - len(h.argv)}"
    )


def test_enqueue_argv_layout_and_per_task_keys() -> None:
    """enqueue documents each group's fields as +0..; the body's strides match the header; the
    tasks name their profile, and each task's hash key comes in order, its lock key after it."""
    h = parse("enqueue")
    strides = dict(h.argv_groups)
    assert list(strides) == ["profile", "task"], h.argv_groups
    argv_text = h.section("ARGV")
    profile_text, _, task_text = argv_text.partition("fields per task")
    assert sorted({int(x) for x in _OFFSET.findall(profile_text)}) == list(range(strides["profile"]))
    assert sorted({int(x) for x in _OFFSET.findall(task_text)}) == list(range(strides["task"]))
    assert re.search(rf"PROFILE_STRIDE, TASK_STRIDE = {strides['profile']}, {strides['task']}\b", h.body), (
        "the body's strides match the header"
    )

    call = BUILDERS["enqueue"]()
    args = call.args
    n, m = args[0], args[1]
    assert (n, m) == (BATCH_ITEMS, 2), "the second task (unique) has a profile of its own"
    first_task = 2 + m * strides["profile"]
    profiles = [args[2 + j * strides["profile"] : 2 + (j + 1) * strides["profile"]] for j in range(m)]
    assert [p[0] for p in profiles] == ["job", "job"] and [p[8] for p in profiles] == [0, 60_000]
    for i, task_id in enumerate(["ID-1", "ID-2"]):
        fields = args[first_task + i * strides["task"] : first_task + (i + 1) * strides["task"]]
        assert fields[0] == task_id and fields[1] == i + 1
    assert call.keys[4:] == (K.task("ID-1"), K.task("ID-2"), K.unique("UK"))


@pytest.mark.parametrize("name", script_names())
def test_body_reads_only_declared_slots(name: str) -> None:
    h = parse(name)
    used_keys = {int(i) for i in re.findall(r"KEYS\[(\d+)\]", h.body)}
    assert used_keys <= set(range(1, len(h.keys) + 1)), f"lua/{name}.lua reads undeclared KEYS {used_keys}"
    assert used_keys == set(range(1, len(h.keys) + 1)), f"lua/{name}.lua declares KEYS it never reads"
    if h.argv_start is None:
        used_args = {int(i) for i in re.findall(r"ARGV\[(\d+)\]", h.body)}
        assert used_args == set(h.argv), f"lua/{name}.lua: ARGV read {used_args}, declared {h.argv}"


_RETURNED_CODE = re.compile(r"(?:reply\[#reply \+ 1\]\s*=|\bcode\s*=|\bcode, detail\s*=|return \{)\s*(-\d+)")


@pytest.mark.parametrize("name", script_names())
def test_returns_documents_every_code(name: str) -> None:
    h = parse(name)
    returns = h.section("Returns")
    codes = {int(c) for c in _RETURNED_CODE.findall(h.body)}
    for code in codes:
        assert code in {c.value for c in Code}, f"lua/{name}.lua returns {code}, unknown to qsync.errors.Code"
        assert re.search(rf"(?<![\d-]){code}\b", returns), f"lua/{name}.lua: Returns does not list {code}"
    if "first_wrong_type" in h.body or "{-5," in h.body:
        assert "-5" in returns, f"lua/{name}.lua can refuse with WRONG_TYPE but Returns omits -5"
