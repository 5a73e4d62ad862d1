"""``voip-relay``: the TURN relay on its own.

The relay itself (RFC 8656 core, time-limited credentials) is built in a later step of the
project; until then this command says so plainly instead of pretending to serve.
"""

from __future__ import annotations

import argparse
import sys

PROGRAM = "voip-relay"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROGRAM, description="The TURN relay (not built yet).")
    parser.parse_args(argv)
    print(
        f"{PROGRAM}: the TURN relay is not part of this release yet; "
        "calls cannot be relayed by this version.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
