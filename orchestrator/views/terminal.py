"""The console every command prints its tables and progress to (rich)."""
from __future__ import annotations

import functools

from rich.console import Console


@functools.cache
def console() -> Console:
    """Made on first use, not at import: terminal width on a terminal, 120 columns in logs
    (`ray job submit`, CI), whatever the process's stdout is when it prints."""
    return Console(width=None if Console().is_terminal else 120)
