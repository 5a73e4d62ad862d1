"""What every command-line tool shares: reading a password, and reporting a failure.

A ``VoipError`` becomes one line on standard error and exit status 1 (2 for usage errors, as
argparse does); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import getpass
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

from overlay.errors import VoipError

JSON_SCHEMA_VERSION = 1


class PasswordInputError(VoipError):
    """No password was given."""

    code = "no-password"


def read_password(
    prompt: str, *, confirm: bool = False, from_stdin: bool = False, stdin: TextIO | None = None
) -> str:
    """Ask for a password (twice when ``confirm``), or read one line of standard input."""
    if from_stdin:
        line = (stdin or sys.stdin).readline()
        password = line.rstrip("\r\n")
        if not password:
            raise PasswordInputError("No password on standard input (--password-stdin).")
        return password
    if not sys.stdin.isatty():
        raise PasswordInputError(
            "Standard input is not a terminal; use --password-stdin to pass the password."
        )
    try:
        password = getpass.getpass(prompt)
        if confirm and getpass.getpass("Repeat the password: ") != password:
            raise PasswordInputError("The two passwords differ.")
    except (EOFError, KeyboardInterrupt):
        raise PasswordInputError("No password given.") from None
    if not password:
        raise PasswordInputError("No password given.")
    return password


def print_json(document: dict[str, Any], out: TextIO | None = None) -> None:
    body = {"schema_version": JSON_SCHEMA_VERSION, **document}
    print(json.dumps(body, sort_keys=True), file=out or sys.stdout)


def run_command(program: str, body: Callable[[], int], json_errors: bool = False) -> int:
    """Run a command's body; a ``VoipError`` becomes one line and exit status 1."""
    try:
        return body()
    except VoipError as exc:
        if json_errors:
            print_json({"ok": False, "error": {"code": exc.code, "message": str(exc)}})
        print(f"{program}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{program}: interrupted.", file=sys.stderr)
        return 130
