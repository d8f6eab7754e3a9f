"""User-facing errors: one line, exit status 2, no traceback.

Every check on user input (config keys, names, paths, class counts) raises
`UserError`; entry points wrap `main()` in `exit_on_user_error` so the user sees
the one line that names the problem and the valid choices.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable, Iterable, TypeVar

T = TypeVar("T")


class UserError(Exception):
    """Bad input from the user; the message is the whole report."""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> UserError:
    return UserError(f"unknown {kind} {name!r}; valid choices: {', '.join(sorted(valid))}")


def exit_on_user_error(main: Callable[..., T]) -> Callable[..., T]:
    """Turn a UserError escaping `main` into one line on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapped
