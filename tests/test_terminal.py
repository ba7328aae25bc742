"""A monitored run in a real terminal (a pty made by the test): the command sees a terminal
of the right size, a curses program runs, the bytes are saved as written, Ctrl-Z and `fg`
work as in a shell, and off a terminal nothing changes."""

from __future__ import annotations

import os
import select
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CAPSULA, load, only_capsule

fcntl = pytest.importorskip("fcntl")
termios = pytest.importorskip("termios")


def _read_all(master: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> bytes:
    out, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer is gone
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return out


def _in_terminal(args: list[str], cwd: Path, *, rows: int = 33, cols: int = 111) -> tuple[int, bytes]:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = {**os.environ, "TERM": "xterm"}
    proc = subprocess.Popen(args, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
    os.close(slave)
    try:
        out = _read_all(master, proc)
        return proc.wait(timeout=30), out
    finally:
        os.close(master)


def test_the_command_sees_a_terminal_of_the_right_size_and_the_bytes_are_saved_as_written(repo: Path) -> None:
    code = (
        "import os, sys\n"
        "size = os.get_terminal_size()\n"
        "print(os.isatty(1), os.isatty(2), size.columns, size.lines)\n"
        "sys.stderr.write('to stderr\\n')\n"
        "sys.stdout.write('no\\r\\nnewline translation\\n')\n"
    )
    code_, out = _in_terminal([sys.executable, str(CAPSULA), "monitor", "-q", sys.executable, "-c", code], repo)
    assert code_ == 0, out
    capsule = only_capsule(repo / "vault")
    assert (capsule / "stdout.txt").read_bytes() == b"True True 111 33\nno\r\nnewline translation\n"
    assert (capsule / "stderr.txt").read_bytes() == b"to stderr\n"
    assert load(capsule / "post-run-info.json")["terminal"] is True
    assert b"True True 111 33" in out and b"to stderr" in out


def test_a_curses_program_runs(repo: Path) -> None:
    code = "import curses\ncurses.wrapper(lambda s: (s.addstr(0, 0, 'curses ok'), s.refresh(), curses.napms(50)))\n"
    status, out = _in_terminal([sys.executable, str(CAPSULA), "monitor", "-q", sys.executable, "-c", code], repo)
    assert status == 0, out
    assert b"curses ok" in (only_capsule(repo / "vault") / "stdout.txt").read_bytes()


def test_no_tty_and_pipes_keep_pipes(repo: Path) -> None:
    code = "import os; print(os.isatty(1))"
    status, _ = _in_terminal(
        [sys.executable, str(CAPSULA), "monitor", "-q", "--no-tty", sys.executable, "-c", code], repo
    )
    assert status == 0
    (capsule,) = (repo / "vault").iterdir()
    assert (capsule / "stdout.txt").read_bytes() == b"False\n" and "terminal" not in load(
        capsule / "post-run-info.json"
    )
    piped = subprocess.run(
        [sys.executable, str(CAPSULA), "monitor", "-q", sys.executable, "-c", code], cwd=repo, capture_output=True
    )
    assert piped.stdout == b"False\n"


def _until(master: int, wanted: bytes, seen: bytearray, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while wanted not in seen:
        assert time.monotonic() < deadline, bytes(seen)
        if select.select([master], [], [], 0.1)[0]:
            seen += os.read(master, 65536)


def _controlling(slave: int, args: list[str], cwd: Path, **env: str) -> subprocess.Popen[bytes]:
    """Start ``args`` as the session leader of a terminal that is its controlling terminal, in
    its foreground, as a login shell is."""

    def take_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    return subprocess.Popen(
        args,
        cwd=cwd,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env={**os.environ, "TERM": "xterm", **env},
        start_new_session=True,
        preexec_fn=take_terminal,
    )


def test_ctrl_z_stops_the_run_as_a_job_and_fg_continues_it(repo: Path) -> None:
    """An interactive bash in a terminal: Ctrl-Z stops the command and bash takes over; fg resumes it."""
    master, slave = os.openpty()
    bash = _controlling(slave, ["bash", "--norc", "--noprofile", "-i"], repo, TERM="dumb", PS1="$ ")
    os.close(slave)
    seen = bytearray()
    try:
        code = "import time; print('start' 'ed', flush=True); time.sleep(2); print('fin' 'ished', flush=True)"
        os.write(master, f"'{sys.executable}' '{CAPSULA}' monitor -q '{sys.executable}' -c \"{code}\"\n".encode())
        _until(master, b"started\r\n", seen)
        os.write(master, b"\x1a")  # Ctrl-Z
        _until(master, b"Stopped", seen)
        stopped_at = time.monotonic()
        time.sleep(0.5)
        assert b"finished" not in seen  # the command is stopped too
        os.write(master, b"fg\n")
        _until(master, b"finished", seen)
        assert time.monotonic() - stopped_at >= 0.5
        os.write(master, b"echo DONE $?\n")
        _until(master, b"DONE 0", seen)
        os.write(master, b"exit\n")
        bash.wait(timeout=20)
    finally:
        if bash.poll() is None:
            bash.kill()
            bash.wait()
        os.close(master)
    assert load(only_capsule(repo / "vault") / "post-run-info.json")["status"] == "completed"


def test_a_resized_window_resizes_the_commands_terminal(repo: Path) -> None:
    code = (
        "import os, signal, sys, time\n"
        "seen = []  # as a curses program does: the size is read again on each SIGWINCH\n"
        "signal.signal(signal.SIGWINCH, lambda *a: seen.append(tuple(os.get_terminal_size())))\n"
        "print('ready', os.get_terminal_size().columns, flush=True)\n"
        "deadline = time.monotonic() + 20\n"
        "while (132, 50) not in seen and time.monotonic() < deadline: time.sleep(0.02)\n"
        "print('resized', *seen[-1], flush=True)\n"
    )
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = _controlling(slave, [sys.executable, str(CAPSULA), "monitor", "-q", sys.executable, "-c", code], repo)
    os.close(slave)
    seen = bytearray()
    try:
        _until(master, b"ready 80", seen)
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 132, 0, 0))  # the user resizes the window
        _until(master, b"resized", seen)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert b"resized 132 50" in (only_capsule(repo / "vault") / "stdout.txt").read_bytes()


@pytest.mark.parametrize("end", ["exit", "kill"])
def test_the_terminals_modes_are_restored_however_the_run_ends(repo: Path, end: str) -> None:
    """A command that puts the terminal in raw mode and then dies (or exits without undoing
    it) leaves the terminal as it found it."""
    code = "import os, sys, tty; tty.setraw(0); print('raw', flush=True)\n"
    code += "os.kill(os.getpid(), 9)\n" if end == "kill" else "sys.exit(3)\n"
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    proc = _controlling(slave, [sys.executable, str(CAPSULA), "monitor", "-q", sys.executable, "-c", code], repo)
    try:
        out = _read_all(master, proc)
        assert proc.wait(timeout=20) == (137 if end == "kill" else 3), out
        assert b"raw" in out
        assert termios.tcgetattr(slave) == before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(slave)
        os.close(master)
