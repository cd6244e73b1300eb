"""
Files a run can trust: every output (shards, index.json, checkpoints, logs, plots, results tables) is written
through atomic_write, so a reader - or a run killed mid-write and relaunched - finds the old file or the complete
new one, never half of one; and nothing the user pointed at is replaced by a regular file (a link is written
through, a FIFO or a device refused). The standard library only: logger.py's plots and bench/'s tables need no
torch to import it.
"""

import contextlib
import errno
import os
import re


@contextlib.contextmanager
def atomic_write(path):
    """with atomic_write(path) as temp: write the file `temp` -> it replaces `path` whole (fsync, os.replace), or is
    removed however the block ends. The writers of shards, index.json, checkpoints, logs and plots go through here,
    so each file is the old one or the complete new one, never half, and:
    - a symlink is written through: its target is replaced, the link stays;
    - anything else that is not a regular file (a folder, a FIFO, a device) is refused with FileExistsError;
    - the new file gets the umask's mode, as open() gives (not mkstemp's 0600), so a teammate can read a run;
    - the temp name `<target>.tmp<pid>` is one per process, so two processes never collide; one process writes
      a given file from one thread at a time."""
    target = regular_target(path)
    temp = f"{target}.tmp{os.getpid()}"
    try:
        if os.path.lexists(temp):
            os.unlink(temp)  # a leftover of a killed process that had our pid: a fresh file, with a fresh mode
        yield temp
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the bytes are on disk before the rename makes them visible
        finally:
            os.close(fd)
        os.replace(temp, target)  # atomic on POSIX and Windows
    except OSError as e:
        if e.filename in (None, temp):  # (a full disk's write error names no file)
            e.filename = path  # the message names the file the user knows, not a temp that is gone
        raise
    finally:
        if os.path.lexists(temp):
            os.unlink(temp)
    fsync_dir(os.path.dirname(target))


def regular_target(path):
    """The file a write to `path` should replace: path itself, or a symlink's target (the link stays). One that
    exists and is not a regular file (a folder, a FIFO, a device) raises FileExistsError: never replaced."""
    target = os.path.realpath(path) if os.path.islink(path) else os.path.abspath(path)
    if os.path.lexists(target) and not os.path.isfile(target):
        raise FileExistsError(errno.EEXIST, "exists and is not a regular file; not replacing it", path)
    return target


def fsync_dir(d):
    """Make a rename in d durable (POSIX); some filesystems refuse an fd on a directory, which is harmless."""
    try:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def temp_writer(name):
    """The pid that is writing a temp file atomic_write named (`<target>.tmp<pid>`), or None for other names."""
    m = re.fullmatch(r".+\.tmp(\d+)", name)
    return int(m.group(1)) if m else None


def pid_alive(pid):
    """Whether a process with this pid runs on this machine (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True
