"""What the convert/ programs share: running a command body with one-line errors."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def run_command(fn: Callable[[], Any]) -> int:
    """Runs a command body; a user error becomes one ``error: ...`` line on stderr and exit code 1."""
    try:
        fn()
    except (ValueError, OSError) as e:  # ConversionError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; nothing was written.", file=sys.stderr)
        return 130
    return 0
