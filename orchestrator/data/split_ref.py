"""Which samples a split is, as a typed value: a split of the manifest, optionally a part
of it carved for a minival (orchestrator/data/minival.py), optionally one share of it
(orchestrator/data/shares.py).

Its string form, `<base>[@minival|@rest:<m>:<seed>][@share:<k>:<of>]`, is for display,
member keys and the names a runs file stores; code passes the value. `SplitRef.parse`
reads a stored or typed name back, once, at the boundary.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

from orchestrator.base.errors import UserError

_NAME = re.compile(r"^(?P<base>[^@]+)(@(?P<part>minival|rest):(?P<m>\d+):(?P<seed>-?\d+))?"
                   r"(@share:(?P<k>\d+):(?P<of>\d+))?$")


@dataclass(frozen=True)
class SplitRef:
    base: str  # the manifest's split whose shards hold the samples
    part: Literal["minival", "rest"] | None = None  # carved from base: its minival, or the rest of it
    minival: int = 0  # samples per class in the minival (with `part`)
    seed: int = 0  # the minival's seed (with `part`)
    share: tuple[int, int] | None = None  # (k, of): share k of `of` (counted from 0)

    @classmethod
    def parse(cls, name: str | SplitRef) -> SplitRef:
        if isinstance(name, SplitRef):
            return name
        m = _NAME.match(name)
        if not m:
            raise UserError(f"split {name!r} is not a split name (valid: <split>, <split>@minival:<m>:<seed>, "
                            f"<split>@rest:<m>:<seed>, each optionally followed by @share:<k>:<of>)")
        return cls(m["base"], m["part"], int(m["m"] or 0), int(m["seed"] or 0),
                   (int(m["k"]), int(m["of"])) if m["k"] else None)

    def __str__(self) -> str:
        text = self.base
        if self.part:
            text += f"@{self.part}:{self.minival}:{self.seed}"
        if self.share:
            text += f"@share:{self.share[0]}:{self.share[1]}"
        return text

    def carved(self, per_class: int, seed: int) -> tuple[SplitRef, SplitRef]:
        """(this split's minival, the rest of it)."""
        return (replace(self, part="minival", minival=per_class, seed=seed),
                replace(self, part="rest", minival=per_class, seed=seed))

    def share_of(self, k: int, of: int) -> SplitRef:
        return replace(self, share=(k, of))

    def describe_share(self) -> str | None:
        """"2 of 4" for share 1 of 4 (counted from 0); None when this is not a share."""
        return f"{self.share[0] + 1} of {self.share[1]}" if self.share else None
