"""The ``qsync`` command line as real subprocesses (``python -m qsync`` and the ``qsync``
script) against the session's Redis. Every process started here is stopped in a fixture."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import qsync
from qsync import Task, TaskState
from qsync.errors import TaskNotFound
from tests.polling import wait_until
from tests.redis_procs import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
APP = "tests.integration.cli_app:mux"
QSYNC_SCRIPT = Path(sys.executable).parent / "qsync"
_prefixes = itertools.count()


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any QSYNC_* variable, able to import the tests package
    from any folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QSYNC_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path = ROOT, script: bool = False
) -> subprocess.CompletedProcess[str]:
    command = [str(QSYNC_SCRIPT)] if script else [sys.executable, "-m", "qsync"]
    return subprocess.run(
        [*command, *args], env=env or clean_env(), cwd=cwd, capture_output=True, text=True, timeout=60
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single stderr line of a failed command (and no traceback)."""
    err = result.stderr
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("qsync: "), lines[0]
    return lines[0]


class WorkerProcess:
    """A ``python -m qsync worker`` subprocess with its output in files."""

    def __init__(self, args: list[str], env: dict[str, str], folder: Path) -> None:
        self.out_path, self.err_path = folder / "worker.out", folder / "worker.err"
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qsync", "worker", *args], env=env, cwd=ROOT, stdout=out, stderr=err
            )

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def assert_alive(self) -> None:
        code = self.proc.poll()
        assert code is None, f"the worker exited with {code}:\n{self.stderr}"

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, then wait (bounded) for the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            message = f"the worker did not exit {timeout} s after SIGTERM:\n{self.stderr}"
            raise AssertionError(message) from None

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def factory(*args: str, env: dict[str, str] | None = None) -> WorkerProcess:
        folder = tmp_path / f"worker{len(started)}"
        folder.mkdir()
        worker = WorkerProcess(list(args), env or clean_env(), folder)
        started.append(worker)
        return worker

    try:
        yield factory
    finally:
        for worker in started:
            worker.cleanup()


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    c = redis_server.client()
    c.flushall()
    try:
        yield c
    finally:
        c.close()


def new_prefix() -> str:
    return f"cli{next(_prefixes)}"


def state(queue: qsync.Queue, task_id: str, name: str) -> TaskState | None:
    try:
        return queue.info(task_id, queue=name).state
    except TaskNotFound:
        return None


def wait_state(
    queue: qsync.Queue, worker: WorkerProcess | None, task_id: str, name: str, wanted: TaskState
) -> None:
    def check() -> bool:
        if worker is not None:
            worker.assert_alive()
        return state(queue, task_id, name) is wanted

    wait_until(check, f"task {task_id} on {name} to be {wanted}")


def registry(client: redis.Redis, prefix: str) -> list[dict[str, Any]]:
    entries = []
    for member in client.zrange("{" + prefix + "}:servers", 0, -1):
        raw = client.get("{" + prefix + "}:server:" + member.decode())
        if raw is not None:
            entries.append(json.loads(raw))
    return entries


# --- worker ---------------------------------------------------------------------------------------


def test_worker_processes_tasks_and_exits_0_on_sigterm(
    redis_server: RedisServer, client: redis.Redis, spawn: Callable[..., WorkerProcess]
) -> None:
    prefix = new_prefix()
    queue = qsync.new(client, prefix=prefix)
    tasks = [queue.enqueue(Task(t, b"x", retention=60), queue="a") for t in ("cli:sync", "cli:async") * 3]
    worker = spawn(
        APP, "--redis-url", redis_server.url, "--prefix", prefix, "--queues", "a=1", "--concurrency", "2",
        "--shutdown-timeout", "0.5", "--lease-duration", "2",
    )  # fmt: skip
    for info in tasks:
        wait_state(queue, worker, info.id, "a", TaskState.COMPLETED)

    slow = queue.enqueue(Task("cli:slow", retry=3), queue="a")
    wait_state(queue, worker, slow.id, "a", TaskState.ACTIVE)
    entries = registry(client, prefix)
    assert [e["pid"] for e in entries] == [worker.proc.pid]
    assert entries[0]["queues"] == {"a": 1} and entries[0]["concurrency"] == 2

    assert worker.terminate() == 0, worker.stderr
    after = queue.info(slow.id, queue="a")
    assert after.state is TaskState.PENDING, "the running task is handed back on SIGTERM"
    assert after.retried == 0
    assert registry(client, prefix) == []
    assert "Traceback" not in worker.stderr


def test_env_vars_are_honoured(
    redis_server: RedisServer, client: redis.Redis, spawn: Callable[..., WorkerProcess]
) -> None:
    prefix = new_prefix()
    queue = qsync.new(client, prefix=prefix)
    env = clean_env(
        QSYNC_REDIS_URL=redis_server.url, QSYNC_PREFIX=prefix, QSYNC_QUEUES="envq=2,other=1",
        QSYNC_CONCURRENCY="3",
    )  # fmt: skip
    worker = spawn(APP, env=env)
    info = queue.enqueue(Task("cli:async", retention=60), queue="envq")
    wait_state(queue, worker, info.id, "envq", TaskState.COMPLETED)
    entries = wait_until(lambda: registry(client, prefix), "the worker in the registry")
    assert entries[0]["queues"] == {"envq": 2, "other": 1}
    assert entries[0]["concurrency"] == 3
    assert worker.terminate() == 0, worker.stderr


def test_flags_win_over_env_vars(
    redis_server: RedisServer, client: redis.Redis, spawn: Callable[..., WorkerProcess]
) -> None:
    prefix = new_prefix()
    env = clean_env(QSYNC_REDIS_URL=redis_server.url, QSYNC_PREFIX=prefix, QSYNC_CONCURRENCY="3")
    worker = spawn(APP, "--concurrency", "5", "--queues", "flagq=1", env=env)
    entries = wait_until(lambda: registry(client, prefix), "the worker in the registry")
    assert entries[0]["concurrency"] == 5 and entries[0]["queues"] == {"flagq": 1}
    assert worker.terminate() == 0, worker.stderr


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["worker", APP, "--bogus"],
        ["worker", APP, "--concurrency", "0"],
        ["worker", APP, "--concurrency", "many"],
        ["worker", APP, "--lease-duration", "nan"],
        ["worker", APP, "--queues", "a=x"],
        ["worker"],
        ["enqueue", "only-a-type"],
        ["frobnicate"],
        [],
    ],
    ids=lambda args: " ".join(args) or "no-command",
)
def test_bad_flags_exit_2_with_one_line(args: list[str]) -> None:
    result = run_cli(*args)
    line = one_line_error(result)
    assert result.returncode == 2, (result.returncode, line)


def test_bad_env_value_is_a_usage_error() -> None:
    result = run_cli("worker", APP, env=clean_env(QSYNC_CONCURRENCY="abc"))
    assert result.returncode == 2
    assert "--concurrency" in one_line_error(result)


def test_usage_error_points_at_a_real_help_command() -> None:
    for args in (["worker", APP, "--bogus"], ["frobnicate"]):
        line = one_line_error(run_cli(*args))
        assert "qsync qsync" not in line, f"the hint names a command that does not exist: {line}"


@pytest.mark.parametrize(
    ("app", "words"),
    [
        ("no_such_module:mux", "cannot import"),
        ("tests.integration.cli_app:missing", "no attribute"),
        ("tests.integration.cli_app:not_a_handler", "not a qsync.Mux"),
        ("no-colon", "MODULE:ATTR"),
    ],
)
def test_bad_app_is_one_line(redis_server: RedisServer, app: str, words: str) -> None:
    result = run_cli("worker", app, "--redis-url", redis_server.url)
    assert result.returncode != 0
    line = one_line_error(result)
    assert words.lower() in line.lower() or "package.module:mux" in line, line


@pytest.mark.parametrize(
    "args", [["worker", APP], ["enqueue", "cli:sync", "payload"], ["info", "some-id"]], ids=lambda a: a[0]
)
def test_unreachable_redis_is_one_line_without_the_password(args: list[str]) -> None:
    url = f"redis://user:secret@127.0.0.1:{free_port()}/0"
    result = run_cli(*args, "--redis-url", url)
    assert result.returncode != 0
    line = one_line_error(result)
    assert "secret" not in result.stderr + result.stdout
    assert "connect" in line.lower(), line


# --- enqueue, info, .env ----------------------------------------------------------------------------


def _fields(stdout: str) -> dict[str, str]:
    out = {}
    for line in stdout.splitlines():
        name, _, value = line.partition(" ")
        out[name] = value.strip()
    return out


def test_enqueue_and_info_print_the_id_and_state(redis_server: RedisServer, client: redis.Redis) -> None:
    prefix = new_prefix()
    common = ["--redis-url", redis_server.url, "--prefix", prefix]
    result = run_cli("enqueue", "cli:sync", "héllo", "--queue", "q1", "--retry", "2", *common, script=True)
    assert result.returncode == 0, result.stderr
    task_id, task_state = result.stdout.split()
    assert task_state == "pending"
    assert qsync.new(client, prefix=prefix).info(task_id, queue="q1").payload == "héllo".encode()

    info = run_cli("info", task_id, "--queue", "q1", *common)
    assert info.returncode == 0, info.stderr
    fields = _fields(info.stdout)
    assert fields["id"] == task_id
    assert fields["queue"] == "q1"
    assert fields["type"] == "cli:sync"
    assert fields["state"] == "pending"
    assert fields["max_retry"] == "2"
    assert fields["payload"] == "<6 bytes>"

    later = run_cli("enqueue", "cli:sync", "x", "--delay", "3600", *common)
    assert later.returncode == 0, later.stderr
    assert later.stdout.split()[1] == "scheduled"

    missing = run_cli("info", "no-such-task", *common)
    assert missing.returncode == 1
    assert "not found" in one_line_error(missing)


def test_dotenv_file_in_the_current_folder_is_read(
    redis_server: RedisServer, client: redis.Redis, tmp_path: Path
) -> None:
    dot_prefix, env_prefix = new_prefix(), new_prefix()
    (tmp_path / ".env").write_text(f"QSYNC_REDIS_URL={redis_server.url}\nQSYNC_PREFIX={dot_prefix}\n")

    result = run_cli("enqueue", "cli:sync", "from-dotenv", "--queue", "dq", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    task_id = result.stdout.split()[0]
    assert qsync.new(client, prefix=dot_prefix).info(task_id, queue="dq").payload == b"from-dotenv"

    info = run_cli("info", task_id, "--queue", "dq", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert _fields(info.stdout)["state"] == "pending"

    # A real environment variable wins over the .env file.
    result = run_cli("enqueue", "cli:sync", "from-env", "--queue", "dq", cwd=tmp_path,
                     env=clean_env(QSYNC_PREFIX=env_prefix))  # fmt: skip
    assert result.returncode == 0, result.stderr
    task_id = result.stdout.split()[0]
    assert qsync.new(client, prefix=env_prefix).info(task_id, queue="dq").payload == b"from-env"
