"""Child processes of the bench: free ports, start and readiness, CPU clocks, clean stop."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU time all processes on the machine spent busy so far, summed over the CPUs."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


class BenchError(Exception):
    """The bench itself broke: a child died, a non-200 answer, a missing tool."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (clock-tick resolution)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def family_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and of its live descendants (``serve --workers N``: the
    supervisor and its workers), from each one's /proc/<pid>/stat."""
    return _family(pid, cpu_seconds)


SCHEDSTAT = Path("/proc/self/schedstat").is_file()  # (the kernel keeps run-queue waits)


def waited_seconds(pid: int) -> float:
    """How long the live threads of a process were ready to run but waiting for a core
    (the scheduler's run-queue wait, /proc/<pid>/task/<tid>/schedstat's second field; a
    thread that ends takes its part with it); 0 where the kernel keeps no such statistics
    (:data:`SCHEDSTAT`)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            continue  # (a thread gone meanwhile; no schedstat)
    return total / 1e9


def family_waited_seconds(pid: int) -> float:
    """:func:`waited_seconds` of a process and of its live descendants."""
    return _family(pid, waited_seconds)


def _family(pid: int, clock: Callable[[int], float]) -> float:
    """``clock`` summed over a process and its live descendants."""
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += clock(p)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (FileNotFoundError, ProcessLookupError):
            continue  # (gone meanwhile)
    return total


class Child:
    """One long-running child process, its output sent to a log file (never a pipe)."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal reaches us only; we stop it
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def check_alive(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise BenchError(
                f"{self.name} exited with code {code}; see {self.log_path}:\n" + self.tail()
            )

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_http(self, url: str, timeout: float = 20.0) -> None:
        """Wait until a GET of ``url`` gets any HTTP answer (the server is listening)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return
            except urllib.error.HTTPError:
                return  # any status: it is serving
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError(f"{self.name} did not start listening: {url}") from None
                time.sleep(0.05)

    def terminate(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()

    def wait_or_kill(self, timeout: float = 5.0) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def stop_all(children: Sequence[Child]) -> None:
    """SIGTERM to every child, wait for each (SIGKILL after 5 s); kill what is left even if
    interrupted while waiting."""
    try:
        for child in children:
            child.terminate()
        for child in children:
            child.wait_or_kill()
    finally:
        for child in children:
            child.kill()
