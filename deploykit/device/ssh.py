"""The SSH client deploykit drives devices with: the system's OpenSSH ``ssh`` as a subprocess.

So ``~/.ssh/config`` (aliases, ports, jump hosts), agents and known_hosts work as they do for ``ssh``
itself; ``BatchMode=yes`` makes a missing key or an unknown host key an error instead of a prompt.
"""

from __future__ import annotations

import re
import subprocess
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deploykit.errors import InputError

SSH_FAILED = 255  # ssh's own exit status for connection and authentication failures


@dataclass(frozen=True)
class Host:
    user: str | None
    host: str
    port: int | None

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    @property
    def label(self) -> str:
        """The host as report keys and folders name it (the user left out): ``orin``, ``10.0.0.5:2222``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}" if self.port else host

    def __str__(self) -> str:
        return self.destination + (f":{self.port}" if self.port else "")


_HOST = re.compile(r"(?:(?P<user>[A-Za-z0-9._][A-Za-z0-9._-]*)@)?"
                   r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_][A-Za-z0-9._-]*))"
                   r"(?::(?P<port>\d{1,5}))?")


def parse_host(text: str) -> Host:
    """``user@device[:port]``, ``device`` (an alias from ~/.ssh/config), ``user@[::1]:2222``."""
    m = _HOST.fullmatch(text.strip())
    if not m:
        raise InputError(f"--host {text!r}: expected user@device[:port] (or a host alias from ~/.ssh/config)")
    port = int(m["port"]) if m["port"] else None
    if port is not None and not 1 <= port <= 65535:
        raise InputError(f"--host {text!r}: port {port} is not between 1 and 65535")
    return Host(m["user"], m["v6"] or m["host"], port)


@dataclass
class SSH:
    host: Host
    identity: Path | None = None
    options: tuple[str, ...] = ()
    connect_timeout: int = 15
    echo: Callable[[str], None] | None = None  # shows the device's stderr as it comes

    def command(self, remote: str) -> list[str]:
        # ssh takes the first value given for an option: the user's -o come before deploykit's defaults
        cmd = ["ssh"]
        for option in self.options:
            cmd += ["-o", option]
        cmd += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={self.connect_timeout}"]
        if self.host.port:
            cmd += ["-p", str(self.host.port)]
        if self.identity is not None:
            cmd += ["-i", str(self.identity), "-o", "IdentitiesOnly=yes"]
        return cmd + ["--", self.host.destination, remote]

    def run(self, remote: str, stdin: bytes | Callable[[object], None] | None = None) -> tuple[int, str, list[str]]:
        """Run ``remote`` (a POSIX shell command line) on the device: (exit status, stdout, last stderr lines).
        ``stdin``: bytes, or a function that writes to the pipe (a tar stream)."""
        try:
            proc = subprocess.Popen(self.command(remote), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE)
        except FileNotFoundError:
            raise InputError("deploykit bench --host runs the OpenSSH client, and `ssh` is not on PATH "
                             "(apt install openssh-client)") from None
        tail: deque[str] = deque(maxlen=30)
        out: list[bytes] = []

        def read_stderr() -> None:
            assert proc.stderr is not None
            for raw in proc.stderr:
                line = raw.decode(errors="replace").rstrip()
                tail.append(line)
                if self.echo and line:
                    self.echo(line)

        def read_stdout() -> None:
            assert proc.stdout is not None
            out.append(proc.stdout.read())

        readers = [threading.Thread(target=read_stderr, daemon=True), threading.Thread(target=read_stdout, daemon=True)]
        for t in readers:
            t.start()
        assert proc.stdin is not None
        try:
            if callable(stdin):
                stdin(proc.stdin)
            elif stdin is not None:
                proc.stdin.write(stdin)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the far end went away: its exit status and stderr say why
        finally:
            try:
                proc.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass
        rc = proc.wait()
        for t in readers:
            t.join()
        return rc, b"".join(out).decode(errors="replace"), list(tail)
