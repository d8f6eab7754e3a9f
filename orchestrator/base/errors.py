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
    valid = sorted(valid)
    return UserError(f"unknown {kind} {name!r}{did_you_mean(name, valid)}; valid choices: {', '.join(valid)}")


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions), one row at a time."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def did_you_mean(name: str, valid: Iterable[str]) -> str:
    """" (did you mean 'epochs'?)" for the closest valid name, within a third of the name's
    length in edits (at least one, fewer than its length; case ignored), else ''."""
    name = str(name)
    scored = sorted((edit_distance(name.lower(), str(v).lower()), str(v)) for v in valid)
    if scored and scored[0][0] <= max(1, len(name) // 3) and scored[0][0] < len(name):
        return f" (did you mean {scored[0][1]!r}?)"
    return ""


def key_hint(model, loc: tuple, noun: str = "keys") -> str:
    """What follows "unknown key" in a validation error at `loc` of a pydantic model tree:
    the closest valid key, then the valid keys at that place."""
    valid = keys_at(model, loc)
    return f"{did_you_mean(loc[-1], valid)}; valid {noun} there: {', '.join(valid)}"


def keys_at(model, loc: tuple) -> list[str]:
    """The keys a pydantic model tree accepts at `loc` (a validation error's location, the
    unknown key last): walks fields, list items and dict values, Optional unwrapped."""
    from typing import Union, get_args, get_origin

    from pydantic import BaseModel

    def unwrap(t):
        while get_origin(t) is Union or type(t).__name__ == "UnionType":
            t = next((a for a in get_args(t) if a is not type(None)), t)
        return t

    t = model
    for part in loc[:-1]:
        t = unwrap(t)
        if isinstance(t, type) and issubclass(t, BaseModel):
            field = t.model_fields.get(str(part))
            if field is None:
                return []
            t = field.annotation
        elif get_origin(t) in (list, tuple, set) and isinstance(part, int):
            t = get_args(t)[0]
        elif get_origin(t) is dict:
            t = get_args(t)[1]
        else:
            return []
    t = unwrap(t)
    return list(t.model_fields) if isinstance(t, type) and issubclass(t, BaseModel) else []


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
