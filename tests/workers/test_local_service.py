"""``associator run`` and the Procfile processes, started as real processes.

With nothing configured, ``associator run`` starts an embedded Redis, the web and
the worker, and stops them all on Ctrl-C. The Procfile processes, which production
runs, refuse to start without their settings rather than fall back on anything
local.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.support import free_port, processes_in, service_environment, wait_for_status

PROJECT_ROOT = Path(__file__).resolve().parents[2]
SHUTDOWN_TIMEOUT_SECONDS = 5
READY_TIMEOUT_SECONDS = 30
LOG_TIMEOUT_SECONDS = 20
COMMAND_TIMEOUT_SECONDS = 15
LINGER_SECONDS = 2
SETTLE_SECONDS = 1
STOP_EVENTS = {
    "child_stopped",
    "child_killed",
    "embedded_redis_stopped",
    "embedded_redis_stop_timeout",
    "service_stopped",
}


def associator(*args: str) -> list[str]:
    return [sys.executable, "-m", "workers.cli", *args]


class RunningService:
    """One ``associator run`` working in ``directory``, its output kept by line.

    It gets a session of its own, as a shell gives a foreground job, so that
    :meth:`interrupt` can do what Ctrl-C at a terminal does.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.data_dir = directory / "data"
        self.port = free_port()
        self.env = service_environment(
            PORT=str(self.port),
            ASSOCIATOR_DATA_DIR=str(self.data_dir),
            ASSOCIATOR_LOG_FORMAT="json",
            ASSOCIATOR_SHUTDOWN_TIMEOUT_SECONDS=str(SHUTDOWN_TIMEOUT_SECONDS),
            # Short but not zero: a new event still waits in the delay set and
            # comes back through the mover, as in production.
            ASSOCIATOR_SETTLE_SECONDS=str(SETTLE_SECONDS),
        )
        self.lines: list[str] = []
        self.process: subprocess.Popen | None = None
        self.reader: threading.Thread | None = None

    def start(self) -> "RunningService":
        self.process = subprocess.Popen(
            associator("run"),
            cwd=self.directory,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

        try:
            wait_for_status(
                self.url("/readyz"),
                timeout_seconds=READY_TIMEOUT_SECONDS,
                process=self.process,
            )
        except AssertionError as exc:
            self.stop()
            pytest.fail(f"{exc}\n{self.output()}")
        # Ready to take events only once the worker listens too.
        self.wait_for_log(lambda line: line["event"] == "worker_ready")
        return self

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def command(self, *args: str) -> subprocess.CompletedProcess:
        """Another ``associator`` command with the same environment and directory."""
        return subprocess.run(
            associator(*args),
            cwd=self.directory,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_SECONDS,
        )

    def log(self) -> list[dict]:
        """The JSON log lines of the run and its children, in order."""
        parsed = []
        for line in list(self.lines):
            if line.startswith("{"):
                try:
                    parsed.append(json.loads(line))
                except ValueError:
                    continue
        return parsed

    def wait_for_log(self, predicate, timeout_seconds=LOG_TIMEOUT_SECONDS) -> dict:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            for line in self.log():
                if predicate(line):
                    return line
            time.sleep(0.1)
        pytest.fail(f"no such log line in {timeout_seconds}s:\n{self.output()}")

    def output(self) -> str:
        return "--- output of associator run ---\n" + "\n".join(self.lines)

    def interrupt(self) -> None:
        os.killpg(self.process.pid, signal.SIGINT)

    def stop(self) -> None:
        """Interrupt the run unless it has ended; kill it if it will not stop."""
        if self.process.poll() is None:
            self.interrupt()
            try:
                self.process.wait(3 * SHUTDOWN_TIMEOUT_SECONDS + 5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.reader.join(timeout=LINGER_SECONDS)


def processes_left_in(directory: Path) -> list[tuple[int, str]]:
    """What still runs in ``directory`` after a short grace for exiting processes."""
    deadline = time.monotonic() + LINGER_SECONDS
    while (left := processes_in(directory)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    running = RunningService(tmp_path_factory.mktemp("run")).start()
    yield running
    running.stop()


def test_send_test_event_is_accepted_and_skipped_for_lack_of_credentials(service):
    sent = service.command("send-test-event", "contact.creation", "123")

    assert sent.returncode == 0, sent.stderr
    assert "-> 204" in sent.stdout
    event_id = json.loads(sent.stdout.splitlines()[-1])["eventId"]

    outcome = service.wait_for_log(
        lambda line: (
            line["event"] == "event_outcome" and line.get("event_id") == event_id
        )
    )
    assert outcome["process"] == "worker"
    assert outcome["outcome"] == "skipped"
    assert outcome["reason"] == "no_credentials"
    assert outcome["object"] == "contact:123"


def test_a_second_run_on_the_same_data_dir_is_refused_naming_the_directory(service):
    second = service.command("run")

    assert second.returncode != 0
    assert str(service.data_dir.resolve()) in second.stderr
    # The refused run leaves the first one serving.
    assert requests.get(service.url("/readyz"), timeout=5).status_code == 200


def test_ctrl_c_stops_web_worker_and_redis_in_order_and_exits_0(tmp_path):
    service = RunningService(tmp_path).start()
    try:
        running = " ".join(command for _, command in processes_in(tmp_path))
        for program in ("redis-server", "gunicorn", "celery"):
            assert program in running

        service.interrupt()
        code = service.process.wait(3 * SHUTDOWN_TIMEOUT_SECONDS + 5)
    finally:
        service.stop()

    assert code == 0, service.output()
    stops = [
        (line["event"], line.get("child"), line.get("code", line.get("status")))
        for line in service.log()
        if line["event"] in STOP_EVENTS
    ]
    # Web first, so nothing new arrives; each within the shutdown timeout, or it
    # would have been killed.
    assert stops == [
        ("child_stopped", "web", 0),
        ("child_stopped", "worker", 0),
        ("embedded_redis_stopped", None, 0),
        ("service_stopped", None, None),
    ], service.output()
    assert processes_left_in(tmp_path) == []
    # Nothing still holds the output the run shared with its children.
    assert not service.reader.is_alive()


def procfile() -> dict[str, str]:
    entries = {}
    for line in (PROJECT_ROOT / "Procfile").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, command = line.split(":", 1)
            entries[name.strip()] = command.strip()
    return entries


def local_command(name: str) -> list[str]:
    """The Procfile command of ``name``, run by this Python on a loopback port."""
    program, *args = shlex.split(procfile()[name])
    args = [arg.replace("0.0.0.0:$PORT", "127.0.0.1:0") for arg in args]
    return [sys.executable, "-m", program, *args]


def run_refused(command: list[str], directory: Path, env: dict[str, str]):
    result = subprocess.run(
        command,
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_SECONDS,
    )

    # Refusing means starting nothing local instead: no embedded Redis and no
    # data directory, and nothing left running.
    assert not (directory / ".associator").exists()
    assert processes_left_in(directory) == []
    return result


def test_procfile_declares_exactly_a_web_and_a_worker_process():
    assert list(procfile()) == ["web", "worker"]


def test_procfile_web_serves_the_app_factory_on_port_on_every_interface():
    web = shlex.split(procfile()["web"])

    assert web[0] == "gunicorn"
    assert web[web.index("--bind") + 1] == "0.0.0.0:$PORT"
    assert web[-1] == "webhook:create_app()"
    # Loaded once in the master, a missing setting ends gunicorn at once instead
    # of failing every worker's boot.
    assert "--preload" in web


def test_procfile_worker_runs_the_celery_app_of_workers_worker():
    worker = shlex.split(procfile()["worker"])

    assert worker[:4] == ["celery", "-A", "workers.worker", "worker"]


def test_procfile_web_refuses_to_start_without_redis_url_and_client_secret(
    tmp_path,
):
    result = run_refused(local_command("web"), tmp_path, service_environment())

    assert result.returncode != 0
    assert "REDIS_URL" in result.stderr
    assert "HUBSPOT_CLIENT_SECRET" in result.stderr


def test_procfile_worker_refuses_to_start_without_an_access_token(tmp_path):
    # Nothing listens there: the worker must give up before it connects.
    env = service_environment(REDIS_URL=f"redis://127.0.0.1:{free_port()}/0")

    result = run_refused(local_command("worker"), tmp_path, env)

    assert result.returncode != 0
    assert "HUBSPOT_ACCESS_TOKEN" in result.stderr
