"""A command the lab runs (an argument list, maybe with stdin), and running it with a bound wait.

Plans are lists of `Command`s so they can be printed, unit-tested and run the same way.
Nothing here uses a shell.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

#: No single lab command (ip, iptables, tc, nft, sysctl) should take longer than this.
COMMAND_TIMEOUT_S = 15.0


class LabError(Exception):
    """The NAT lab failed."""


class CommandFailed(LabError):
    """A lab command exited non-zero."""

    def __init__(self, command: Command, detail: str) -> None:
        super().__init__(f"`{command}` failed: {detail}")
        self.command = command
        self.detail = detail


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    stdin: str | None = None

    def __str__(self) -> str:
        text = shlex.join(self.argv)
        if self.stdin is not None:
            text += f" <<'EOF'\n{self.stdin.rstrip()}\nEOF"
        return text


def ip(ns: str, *args: str) -> Command:
    """`ip` run against namespace `ns` (no mount-namespace switch, so it is cheap)."""
    return Command(("ip", "-n", ns, *args))


def in_ns(ns: str, *argv: str, stdin: str | None = None) -> Command:
    """Any program run inside namespace `ns`."""
    return Command(("ip", "netns", "exec", ns, *argv), stdin)


def sysctl(ns: str, *settings: str) -> Command:
    """`sysctl -w` inside `ns`; unknown keys are ignored (-e), e.g. br_netfilter ones."""
    return in_ns(ns, "sysctl", "-q", "-e", "-w", *settings)


def run(command: Command, *, check: bool = True, timeout: float = COMMAND_TIMEOUT_S) -> str:
    """Run `command`; return its stdout. Raise `CommandFailed` with a one-line reason."""
    try:
        done = subprocess.run(
            command.argv,
            input=command.stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError:
        raise CommandFailed(command, f"{command.argv[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise CommandFailed(command, f"no answer within {timeout:.0f} s") from None
    if check and done.returncode != 0:
        detail = " ".join(done.stderr.split()) or f"exit status {done.returncode}"
        raise CommandFailed(command, detail)
    return done.stdout


def run_all(commands: Sequence[Command]) -> None:
    for command in commands:
        run(command)
