"""One writer per run directory: an advisory `fcntl` lock on `<run>/.lock`, holding the writer's pid.

The kernel drops the lock when its process dies (kill -9 included), so a lock left by a dead process is
simply taken over; a live holder makes a second training into the same directory fail with one line.
"""
from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

from ..errors import VitlabError


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / ".lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:  # never through a link (truncating what it points at), never a FIFO (blocking)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise VitlabError(f"'{self.path}' cannot be the run's lock ({exc.strerror}: a symbolic link?); remove "
                              f"it, or pass --savefile NAME for a new run") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise VitlabError(f"'{self.path}' is not a regular file; remove it, or pass --savefile NAME")
        self.file = os.fdopen(fd, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise VitlabError(f"'{run_dir}' is being written by another training (pid {holder}); wait for it to "
                              f"finish, or pass --savefile NAME for a new run") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
