"""Exclusive output destinations: the operator's half (docs/outputs.md).

Before a job's children are created, the FineTuneJobs of its namespace are read: a job whose
`output.destination` is the same as, inside, or around the destination of another job that
holds it fails at once with `DestinationInUse`, creating nothing. A job holds its destination

- while it is live (any phase but Failed): its trainer is, or will be, writing there;
- once it Succeeded: its Model points at those files, with their digests;
- before its first phase, if it is older (creationTimestamp, then UID): of two jobs created
  together, the older one goes first.

A Failed job holds nothing here (its files hold no result; the trainer's owner file still keeps
another job from resuming its checkpoints). This check is the early, readable refusal; the owner
file the trainer writes into the destination (finetune_trainer.ownership) is what makes it
exclusive against races this check cannot see, and for jobs that were deleted but whose files
remain.
"""

from __future__ import annotations

from . import sources

HOLDING_WHEN_UNSTARTED = "not started yet, and created first"


def _destination(raw: dict) -> str | None:
    output = (raw.get("spec") or {}).get("output") or {}
    destination = output.get("destination")
    return destination if isinstance(destination, str) else None


def _age_key(raw: dict) -> tuple[str, str]:
    meta = raw.get("metadata") or {}
    return meta.get("creationTimestamp") or "", meta.get("uid") or ""


def holds(other: dict, mine: dict) -> str | None:
    """Why `other` holds its destination against `mine` (a few words), or None if it does not."""
    phase = (other.get("status") or {}).get("phase")
    if phase == "Failed":
        return None
    if phase:
        return phase
    return HOLDING_WHEN_UNSTARTED if _age_key(other) < _age_key(mine) else None


def conflict(mine: dict, jobs: list[dict]) -> str | None:
    """The message for a destination another job holds, or None if `mine` may use its own."""
    destination = _destination(mine)
    if destination is None:
        return None
    uid = (mine.get("metadata") or {}).get("uid")
    for other in sorted(jobs, key=_age_key):
        meta = other.get("metadata") or {}
        theirs = _destination(other)
        if meta.get("uid") == uid or theirs is None or not sources.overlaps(destination, theirs):
            continue
        why = holds(other, mine)
        if why is None:
            continue
        relation = "is the destination of" if sources.destination_key(destination) == sources.destination_key(theirs) \
            else "overlaps the destination of"
        return (f"output.destination {destination} {relation} FineTuneJob {meta.get('name')} ({why}): {theirs}. "
                "Destinations are exclusive (not the same, not nested); choose another destination")
    return None
