"""``voipctl msg`` and ``voipctl inbox``: sending instant messages and showing them.

    voipctl msg bob "are you free?"   Delivered to bob.
                                      bob is offline: queued; delivered at bob's next login.
    voipctl inbox [--clear]           2025-01-02 10:00:00 UTC  alice: are you free?
    voipctl inbox --sent              what you sent, and whether it was delivered

The daemon's side is ``client.messaging.Messenger``; ``--json`` prints its result with
``"schema_version": 1``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from overlay.terminal import print_json

Call = Callable[..., dict[str, Any]]
KEY_WARNING = "!! KEY CHANGED: this may not be {name}; check with voipctl verify {name} !!"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def sent_line(result: dict[str, Any]) -> str:
    to = result.get("to")
    if result.get("outcome") == "delivered":
        return f"Delivered to {to}."
    return f"{to} is offline: queued; delivered at {to}'s next login."


def inbox_lines(messages: list[dict[str, Any]]) -> list[str]:
    lines = []
    for m in messages:
        sender = m.get("from", "?")
        if m.get("key_changed"):
            lines.append(KEY_WARNING.format(name=sender))
        lines.append(f"{_when(float(m.get('sent_at') or 0))}  {sender}: {m.get('text')}")
    return lines


def outbox_lines(messages: list[dict[str, Any]]) -> list[str]:
    return [
        f"{_when(float(m.get('sent_at') or 0))}  to {m.get('to')} ({m.get('state')}): "
        f"{m.get('text')}"
        for m in messages
    ]


def cmd_msg(args: argparse.Namespace, call: Call) -> int:
    request = {"username": args.username, "text": args.text}
    result = call(args.socket, "msg", request, _progress)
    if args.json:
        print_json(result)
    else:
        print(sent_line(result))
    return 0


def cmd_inbox(args: argparse.Namespace, call: Call) -> int:
    request = {"sent": args.sent, "clear": args.clear}
    result = call(args.socket, "inbox", request, _progress)
    if args.json:
        print_json(result)
        return 0
    if args.sent:
        lines = outbox_lines(result.get("sent") or []) or ["Nothing sent yet."]
    else:
        lines = inbox_lines(result.get("messages") or []) or ["No messages."]
    print("\n".join(lines))
    if "cleared" in result:
        print(f"Cleared {result['cleared']} messages.", file=sys.stderr)
    return 0


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    msg = sub.add_parser("msg", parents=[common], help="send an instant message")
    msg.add_argument("username")
    msg.add_argument("text")
    inbox = sub.add_parser("inbox", parents=[common], help="messages received, newest last")
    inbox.add_argument("--sent", action="store_true", help="what you sent, and its state")
    inbox.add_argument("--clear", action="store_true", help="empty the inbox after listing it")
