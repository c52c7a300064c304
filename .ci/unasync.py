"""Generate qsync/client.py (sync Queue) from qsync/aio.py (AsyncQueue) by plain text rewrites.

    python .ci/unasync.py          write qsync/client.py
    python .ci/unasync.py --check  fail if qsync/client.py is not what aio.py generates

Every rewrite must be used at least once, so a stale rule fails loudly (httpcore's habit).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE, TARGET = ROOT / "qsync" / "aio.py", ROOT / "qsync" / "client.py"

RULES: list[tuple[str, str]] = [
    (r'"""AsyncQueue: the asyncio client\.', '"""Queue: the sync client.'),
    (r"only awaits their I/O", "only runs their I/O"),
    (
        r"``qsync/client\.py`` \(the sync :class:`~qsync\.Queue`\) is generated from this file by\n"
        r"``\.ci/unasync\.py``; edit this one and run ``make unasync``\.",
        "GENERATED from ``qsync/aio.py`` by ``.ci/unasync.py``: do not edit; edit aio.py and run\n"
        "``make unasync``.",
    ),
    (r"import redis\.asyncio as aioredis", "import redis"),
    (r"from \._atransport import AsyncTransport", "from ._transport import SyncTransport"),
    (r"AsyncTransport\(", "SyncTransport("),
    (r"aioredis\.", "redis."),
    (r"redis\.asyncio\.Redis`` or ``redis\.asyncio\.RedisCluster", "redis.Redis`` or ``redis.RedisCluster"),
    (r"for asyncio programs", "for threads and plain scripts"),
    (r"\bAsyncQueue\b", "Queue"),
    (r"\bAsyncServing\b", "SyncServing"),
    (r"async def ", "def "),
    (r"await ", ""),
]


def generate(text: str) -> str:
    for pattern, replacement in RULES:
        text, count = re.subn(pattern, replacement, text)
        if count == 0:
            sys.exit(f"unasync: rule {pattern!r} matched nothing; update .ci/unasync.py")
    return text


def formatted(text: str) -> str:
    """The text as ``ruff format`` leaves it, so the check compares like with like."""
    for command in (["check", "--select", "I", "--fix", "--quiet"], ["format"]):
        done = subprocess.run(
            [sys.executable, "-m", "ruff", *command, "--stdin-filename", str(TARGET), "-"],
            input=text, capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        text = done.stdout
    return text


def main() -> None:
    out = formatted(generate(SOURCE.read_text()))
    if "--check" in sys.argv:
        if not TARGET.exists() or TARGET.read_text() != out:
            sys.exit("unasync: qsync/client.py is out of date with qsync/aio.py; run 'make unasync'")
        print("unasync: qsync/client.py matches qsync/aio.py")
    else:
        TARGET.write_text(out)


if __name__ == "__main__":
    main()
