"""Which rows choose and which rows report: the evaluation protocol of a runs file.

Nothing is reported on rows that chose it. In order of preference:

1. **minival**: the runs file names a minival (held out of train, `data.minival`) and every
   member has predictions on it. Selection and temperatures are fitted there; every row
   of the reported split (val) is reported.
2. **rows a search already chose on**: a search without a minival chose its members on a
   seeded part of val (`choices[].fraction`, `seed`); those rows are never reported, and
   selection or temperatures asked for here are fitted on them too.
3. **disjoint halves**: `--select` or `--calibrate` with neither of the above: a seeded
   `--selection-fraction` of val chooses, the rest reports (the report says so).
4. nothing is chosen: every row reports.

Choices recorded in the runs file that were made on the reported split without a row
record (Tune's metric ranking trials on all of val) cannot be undone here: they are
listed in the report as a warning.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from orchestrator.base.errors import UserError
from orchestrator.records.runs_file import RunsFile


@dataclass
class Protocol:
    selection: np.ndarray | None  # rows of the reported split used to choose (cases 2, 3)
    reported: np.ndarray  # rows of the reported split that are scored
    on_minival: bool = False  # case 1: choose on the minival predictions instead
    notes: list[str] = field(default_factory=list)

    def describe(self, runs: RunsFile) -> dict:
        ds = runs.dataset
        chosen_on = (f"{runs.minival.split} (minival, {runs.minival.samples} samples)" if self.on_minival
                     else f"{ds.split}: {len(self.selection)} held-out rows" if self.selection is not None
                     else "nothing chosen")
        return {"chosen_on": chosen_on, "reported_on": f"{ds.split}: {len(self.reported)} rows",
                "choices": [c.model_dump() for c in runs.choices], "notes": self.notes}


def split_rows(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(selection rows, reported rows): disjoint, by a seeded permutation."""
    if not 0 < fraction < 1:
        raise UserError(f"--selection-fraction must be in (0, 1), got {fraction}")
    perm = np.random.default_rng(seed).permutation(n)
    cut = int(round(n * fraction))
    return np.sort(perm[:cut]), np.sort(perm[cut:])


def protocol_for(runs: RunsFile, records: list, n: int, needs_selection: bool, fraction: float, seed: int) -> Protocol:
    ds = runs.dataset
    on_val = [c for c in runs.choices if c.split == ds.split]
    notes = [f"{c.what} was chosen on {ds.split} (all rows): its figures are optimistic; set data.minival"
             for c in on_val if c.fraction is None]
    if runs.minival is not None and all(r.minival_predictions for r in records):
        return Protocol(None, np.arange(n), True, notes)
    rowed = [c for c in on_val if c.fraction is not None]
    if rowed:
        sel, rest = split_rows(n, rowed[0].fraction, rowed[0].seed or 0)
        return Protocol(sel, rest, False, notes + [f"{rowed[0].what} chose on {len(sel)} rows of {ds.split}, "
                                                   f"which are not reported"])
    if needs_selection:
        sel, rest = split_rows(n, fraction, seed)
        return Protocol(sel, rest, False, notes + [f"no minival: {len(sel)} rows of {ds.split} held out to "
                                                   f"choose on, {len(rest)} reported"])
    return Protocol(None, np.arange(n), False, notes)
