"""Start one container command inside a private mount namespace, then exec it.

Run as a script (stdlib only, so it needs no PYTHONPATH and leaks nothing into the
container's environment):

    python sandbox.py SPEC.json

SPEC is written by `runtime.py`:
    {"command": [...], "env": {...}, "workingDir": "/...", "scratch": "/state/pods/UID/ns",
     "startError": "/state/pods/UID/containers/NAME/start-error",
     "mounts": [{"source": "/host/dir", "target": "/etc/finetune", "readOnly": true}],
     "keepVisible": ["/path/to/venv", ...], "hostname": "pod-0"}

With a hostname (every pod but a hostNetwork one) the process also gets its own UTS namespace
with that hostname, as a pod's sandbox has; the pod's /etc/hosts and /etc/resolv.conf, written
by the node (dns.py), come in as ordinary file mounts.

Host directories in keepVisible (the node's own Python environment, which the container runs)
are bound back, read-only, wherever a volume's mountPath would otherwise hide them.

Each volume is bind-mounted at its mountPath inside a new mount namespace with private
propagation, so nothing is mounted on the host. A mountPath whose parent directories do not
exist (/etc/finetune, /dev/termination-log) would need new directories or files on the host
filesystem; instead the deepest existing ancestor is covered by an overlayfs whose upper layer
lives on a tmpfs private to this namespace, and the ancestor's own submounts (e.g. /dev/pts,
/dev/shm) are bound back on top. The host sees none of it, and it all disappears with the
process. Mount sources and the scratch tmpfs are addressed through file descriptors
(/proc/self/fd/N), so a mount over /tmp cannot hide a state directory that lives under /tmp.

On any failure before exec the reason is written to `startError` and the exit code is 128,
which the runtime reports as reason StartError (as the kubelet does).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import re
import signal
import stat
import sys

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
START_ERROR_EXIT = 128

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class SandboxError(Exception):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(err)} (errno {err})")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: s.encode() if s is not None else None  # noqa: E731
    _check(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {source or fstype} on {target}")


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mount_points() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [_unescape(line.split()[4]) for line in f]


def _under(path: str, ancestor: str) -> bool:
    return ancestor == "/" or path == ancestor or path.startswith(ancestor.rstrip("/") + "/")


class Namespace:
    """Mount bookkeeping for one container's private mount namespace."""

    def __init__(self, scratch: str) -> None:
        _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS) (the process node needs root or CAP_SYS_ADMIN)")
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        self.scratch_path = scratch
        self._scratch_fd = -1
        self._overlays = 0
        self._ours: list[str] = []  # targets whose contents belong to this namespace, not the host

    def mount_scratch(self) -> None:
        scratch = self.scratch_path
        _mount("tmpfs", scratch, "tmpfs", 0, "mode=0700")
        self._scratch_fd = os.open(scratch, os.O_PATH | os.O_DIRECTORY)

    def _scratch(self, name: str) -> str:
        path = f"/proc/self/fd/{self._scratch_fd}/{name}"
        os.makedirs(path, exist_ok=True)
        return path

    def _overlay(self, ancestor: str) -> None:
        """Cover `ancestor` with an overlay whose writable layer is on the scratch tmpfs."""
        if ancestor == "/":
            raise SandboxError("cannot create a new top-level directory without touching the host; "
                               "use a mountPath under an existing directory")
        n = self._overlays = self._overlays + 1
        orig, upper, work = self._scratch(f"orig{n}"), self._scratch(f"upper{n}"), self._scratch(f"work{n}")
        submounts = [m for m in _mount_points() if m != ancestor and _under(m, ancestor)
                     and not _under(m, self.scratch_path)]
        top = [m for m in submounts if not any(o != m and _under(m, o) for o in submounts)]
        _mount(ancestor, orig, None, MS_BIND | MS_REC)
        _mount("overlay", ancestor, "overlay", 0, f"lowerdir={ancestor},upperdir={upper},workdir={work}")
        for m in top:  # the overlay shows the bare directory: put its submounts back
            _mount(os.path.join(orig, os.path.relpath(m, ancestor)), m, None, MS_BIND | MS_REC)
        self._ours.append(ancestor)

    def _ensure_target(self, target: str, is_file: bool) -> None:
        if os.path.lexists(target):
            if os.path.isdir(target) == is_file:
                raise SandboxError(f"mountPath {target} exists as a {'directory' if is_file else 'file'}")
            return
        ancestor = os.path.dirname(target)
        while not os.path.exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        if not any(_under(ancestor, o) for o in self._ours):
            self._overlay(ancestor)
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        if is_file:
            with open(target, "a"):
                pass
        else:
            os.mkdir(target)

    def bind(self, source_fd: int, target: str, is_file: bool, read_only: bool) -> None:
        self._ensure_target(target, is_file)
        _mount(f"/proc/self/fd/{source_fd}", target, None, MS_BIND | MS_REC)
        if read_only:
            _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)
        self._ours.append(target)


def _depth(path: str) -> int:
    return len([p for p in path.split("/") if p])


def prepare(spec: dict) -> None:
    """Set up the mount namespace described by `spec` in this process."""
    mounts = sorted(spec.get("mounts", []), key=lambda m: (_depth(m["target"]), m["target"]))
    ns = Namespace(spec["scratch"])
    # Open every source (in the new namespace: bind mounts refuse sources from another one)
    # before anything is mounted, since later mounts may hide the paths.
    fds = [os.open(m["source"], os.O_PATH) for m in mounts]
    targets = [os.path.normpath(m["target"]) for m in mounts]
    hidden = [p for p in map(os.path.normpath, spec.get("keepVisible", []))
              if any(_under(p, t) and p != t for t in targets)]
    hidden_fds = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in hidden]
    ns.mount_scratch()
    for m, target, fd in zip(mounts, targets, fds):
        ns.bind(fd, target, is_file=not stat.S_ISDIR(os.fstat(fd).st_mode), read_only=bool(m.get("readOnly")))
        os.close(fd)
    for path, fd in zip(hidden, hidden_fds):
        ns.bind(fd, path, is_file=False, read_only=True)
        os.close(fd)


def set_hostname(name: str) -> None:
    """A UTS namespace of the process's own, named like the pod."""
    _check(_libc.unshare(CLONE_NEWUTS), "unshare(CLONE_NEWUTS)")
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), f"sethostname {name}")


def check(directory: str) -> int:
    """`sandbox.py --check DIR`: can we make a private mount namespace with tmpfs and overlayfs?"""
    try:
        ns = Namespace(directory)
        ns.mount_scratch()
        os.mkdir(f"{directory}/probe")
        ns._overlay(f"{directory}/probe")
    except (OSError, SandboxError) as exc:
        print(f"cannot isolate container mounts: {exc}. The process node must run as root (or with "
              "CAP_SYS_ADMIN) on a Linux kernel with overlayfs.", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[1] == "--check":
        return check(argv[2])
    with open(argv[1]) as f:
        spec = json.load(f)
    # Opened now: the path may be hidden by a mount later (closed on exec).
    error_fd = os.open(spec["startError"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        # Die with the process node even if it is SIGKILLed (kept across exec).
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() == 1:
            raise SandboxError("the process node exited before the container started")
        if spec.get("hostname"):
            set_hostname(spec["hostname"])
        if spec.get("mounts"):
            prepare(spec)
        os.chdir(spec.get("workingDir") or "/")
        command = spec["command"]
        env = spec["env"]
        os.execvpe(command[0], command, env)
    except (OSError, SandboxError) as exc:
        message = f"failed to start container: {exc}"
        os.write(error_fd, message.encode())
        print(message, file=sys.stderr, flush=True)
        return START_ERROR_EXIT
    return START_ERROR_EXIT  # not reached: execvpe does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv))
