"""Who owns an output directory, and which files a job may read (torch-free).

Exclusive outputs (docs/outputs.md). Before the trainer touches output.dir (before it clears a
stale result.json, long before a checkpoint is resumed) it claims the directory: it writes
`OWNER_FILE` naming the job (jobName and jobUid), atomically and only if none is there (a hard
link of a complete temporary file, which fails if the name exists). Then:

- no owner file, and nothing else in the directory: this job takes it;
- an owner file naming this job (a retry, a resume after preemption): it carries on;
- an owner file naming another job (another live job; a succeeded job whose Model points here;
  a deleted job whose files remain; an earlier job of the same name, whose UID differs), or
  files but no owner file (outputs of something else): `DestinationInUse`, and nothing in the
  directory is changed.

Two trainers racing for one empty directory: exactly one link succeeds; the other reads the
winner's file and stops. The operator refuses overlapping destinations before it creates
anything (finetune_operator.destinations); this file is what still protects a directory whose
job is gone, or one reached some other way.

Confined inputs: `confined` resolves every symlink of an input file and refuses one that lands
outside its volume's mount (`volumeRoot`), so a link planted in a claim cannot make the trainer
read (and copy into its output) a mounted Secret or a file of the node.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

from finetune_trainer.errors import ConfigError, DestinationInUse
from finetune_trainer.protocol import OWNER_FILE

# Present in a fresh filesystem's root (ext4); not anybody's output.
IGNORED_ENTRIES = frozenset({"lost+found"})


def owner_record(job_name: str, job_uid: str | None) -> dict[str, str | None]:
    return {"jobName": job_name, "jobUid": job_uid}


def _describe(owner: dict) -> str:
    uid = owner.get("jobUid")
    return f"job {owner.get('jobName')!r}" + (f" (uid {uid})" if uid else "")


def read_owner(output_dir: Path) -> dict | None:
    """The owner file's record; None when there is none. Unreadable or malformed: ConfigError."""
    marker = output_dir / OWNER_FILE
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DestinationInUse(f"output.dir: {marker} cannot be read ({exc.strerror}); the destination "
                               "cannot be shown to belong to this job") from None
    with os.fdopen(fd) as f:
        text = f.read(64 * 1024)
    try:
        owner = json.loads(text)
    except json.JSONDecodeError:
        owner = None
    if not isinstance(owner, dict):
        raise DestinationInUse(f"output.dir: {marker} is not a valid owner file; the destination cannot be "
                               "shown to belong to this job")
    return owner


def claim(output_dir: Path, job_name: str, job_uid: str | None) -> None:
    """Make `output_dir` this job's, or raise DestinationInUse without changing anything in it."""
    me = owner_record(job_name, job_uid)
    output_dir.mkdir(parents=True, exist_ok=True)
    owner = read_owner(output_dir)
    if owner is None:
        others = sorted(e.name for e in os.scandir(output_dir) if e.name not in IGNORED_ENTRIES
                        and not (e.name.startswith(f"{OWNER_FILE}.") and e.name.endswith(".tmp")))
        if others:
            shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise DestinationInUse(
                f"output.destination is in use: {output_dir} already holds files ({shown}) and no {OWNER_FILE} "
                "names this job; nothing was changed. Choose an empty destination, or empty this one")
        owner = _create_owner_file(output_dir, me)
    if (owner.get("jobName"), owner.get("jobUid")) != (me["jobName"], me["jobUid"]):
        raise DestinationInUse(
            f"output.destination is in use: {output_dir} belongs to {_describe(owner)}, not to this job "
            f"({_describe(me)}); nothing was changed. Choose another destination, or delete that job's files "
            f"(and {OWNER_FILE}) first. A job never resumes another job's checkpoints")


def _create_owner_file(output_dir: Path, me: dict) -> dict:
    """Write the owner file if none exists; returns the record it holds afterwards (ours, or the
    one a concurrent trainer wrote first)."""
    marker = output_dir / OWNER_FILE
    tmp = output_dir / f"{OWNER_FILE}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, marker)  # atomic, and fails if the name exists: never a half-written owner file
        except FileExistsError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            # A filesystem without hard links: exclusive create, then write (a crash in between
            # leaves an empty owner file, which refuses every job until it is removed).
            try:
                marker_fd = os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            except FileExistsError:
                pass
            else:
                with os.fdopen(marker_fd, "w") as f:
                    json.dump(me, f)
                    f.flush()
                    os.fsync(f.fileno())
    finally:
        tmp.unlink(missing_ok=True)
    return read_owner(output_dir) or {}


def confined(path: str | Path, root: str | None, field: str) -> Path:
    """`path` with every symlink resolved, refused (ConfigError) if that leaves `root`; with no
    root, `path` as it is."""
    if root is None:
        return Path(path)
    resolved = Path(path).resolve()
    base = Path(root).resolve()
    if resolved != base and not resolved.is_relative_to(base):
        raise ConfigError(f"{field}: {path} resolves to {resolved}, outside its volume {root}; symlinks must "
                          "stay inside the volume")
    return resolved


def confined_tree(directory: str | Path, root: str | None, field: str) -> None:
    """Every file and directory under `directory`, through symlinked directories too, resolves inside
    `root` (ConfigError otherwise): what a model loader may open there stays in the volume."""
    if root is None:
        return
    seen: set[Path] = set()
    pending = [confined(directory, root, field)]
    while pending:
        current = pending.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            entries = list(os.scandir(current))
        except (NotADirectoryError, FileNotFoundError):
            continue  # not a directory (yet): the loader says what is missing
        for entry in entries:
            target = confined(entry.path, root, field) if entry.is_symlink() else Path(entry.path)
            if target.is_dir():
                pending.append(target)
