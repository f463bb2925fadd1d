"""The fault-injection suite: the queue's promises checked under crashes, restarts and hostile input.

Every check here is a total-queue check: each acknowledged request ends exactly
once, in a final state, with gapless Responses. Each test reports its counts with
:func:`report`; they must all be 0. The suite runs small in ``.ci/run``;
``scripts/faults`` runs it at a larger scale (``AJS_FAULT_SCALE``) and prints
the table of every report.
"""

from __future__ import annotations

import json
import os

__all__ = ["report", "scale"]


def scale() -> int:
    """How much bigger than the CI run this run is (``AJS_FAULT_SCALE``, 1 by default)."""
    return max(1, int(os.environ.get("AJS_FAULT_SCALE", "1")))


def report(fault: str, *, acknowledged: int, lost: int, duplicated: int, unexpected: int, **extra: object) -> None:
    """Prints one result line and, when ``AJS_FAULT_REPORT`` names a file, appends it there as JSON.

    Args:
        fault: what was done, in a few words (a row of the README's table).
        acknowledged: requests the server acknowledged (or streams, passes: what was counted).
        lost: acknowledged requests that never ended (or ended without their final Response).
        duplicated: requests with more than one final Response, or Responses seen twice.
        unexpected: anything else that broke a promise (a gap in sequences, an INTERNAL answer, ...).
        extra: other figures worth printing (kills, restarts, RSS growth, ...).
    """
    row = {
        "fault": fault,
        "scale": scale(),
        "acknowledged": acknowledged,
        "lost": lost,
        "duplicated": duplicated,
        "unexpected": unexpected,
        **extra,
    }
    print("FAULTS " + json.dumps(row))
    path = os.environ.get("AJS_FAULT_REPORT")
    if path:
        with open(path, "a") as sink:
            sink.write(json.dumps(row) + "\n")
