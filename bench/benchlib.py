"""What every benchmark script shares: the failure type, the size argument, progress lines.

Sizes use the node's own grammar (`d7y_node.config.parse_size`: `256MiB`, `1GiB`, `500MB`, plain
bytes), so a size means the same in a benchmark's flags as in the node's settings.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

from d7y_node.config import parse_size
from d7y_node.errors import ConfigError


class BenchFailed(Exception):
    """Something broke (as opposed to a target being missed): the run cannot be trusted."""


def size_argument(minimum: int = 1) -> Callable[[str], int]:
    """An argparse `type` for a size of at least `minimum` bytes."""

    def parse(text: str) -> int:
        try:
            size = parse_size("size", text)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(f"{error.message} (try 256MiB)") from None
        if size < minimum:
            raise argparse.ArgumentTypeError(f"size must be at least {minimum} bytes")
        return size

    return parse


def log(message: str) -> None:
    """A timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)
