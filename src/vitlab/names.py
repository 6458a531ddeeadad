"""Names users give (task, savefile, sweep, zip row, run, model label) and the places they end up.

A name becomes a path component (a run directory), a word of a generated shell script and text in logs, CSV
cells, HTML and figures. `safe_name` is the one check for the first two: plain ASCII letters, digits and
`. _ - +`, at most 255 bytes, not starting with `.` or `-`; so a name can hold no path separator, no `..`, no
control character and no shell metacharacter, and `shlex.quote` leaves it as it is. `path_inside` joins checked
names under a root and proves the result stays inside it. The other helpers make text safe for one sink each:
`printable` (a log or terminal line), `csv_cell` (a spreadsheet cell); HTML is `html.escape` and figure text
`vitlab.plots.common.plot_text`. `atomic_write` writes a whole file or nothing.
"""
from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from .errors import VitlabError

_NAME = re.compile(r"[A-Za-z0-9_+][A-Za-z0-9._+-]*")
NAME_MAX = 255  # bytes of one path component on Linux and macOS


def safe_name(name: Any, what: str, example: str = "run_02") -> str:
    """`name` as a path component, or one line saying why it cannot be one. `what` says where it came from
    ("output.savefile (--savefile)", "the sweep spec's `name`")."""
    text = str(name)
    if _NAME.fullmatch(text) and len(text.encode()) <= NAME_MAX:
        return text
    if not text.strip():
        why = "is empty"
    elif text in (".", "..") or "/" in text or "\\" in text or os.path.isabs(text):
        why = "is a path, not one folder name"
    elif printable(text) != text:
        why = "holds control characters"
    elif len(text.encode()) > NAME_MAX:
        why = f"is longer than {NAME_MAX} bytes"
    elif text[0] in ".-":
        why = f"starts with '{text[0]}'"
    else:
        bad = "".join(dict.fromkeys(c for c in text if not re.fullmatch(r"[A-Za-z0-9._+-]", c)))
        why = f"holds {bad!r}"
    raise VitlabError(f"{what} must name one folder, but {text[:80]!r} {why}; use letters, digits, "
                      f"'.', '_', '-', '+' (not first: '.', '-'), e.g. {example}")


def path_inside(root: str | Path, *names: str, what: str = "a name") -> Path:
    """root/names..., each name checked by `safe_name`, and the result proven inside `root` (as an absolute,
    normalised path: no name can lead out of it)."""
    path = Path(root).joinpath(*(safe_name(n, what) for n in names))
    base, full = os.path.abspath(root), os.path.abspath(path)
    if os.path.commonpath([base, full]) != base:  # cannot happen with checked names; the guard is the proof
        raise VitlabError(f"{what} leads outside {root}")
    return path


def check_path_text(path: str | Path, what: str) -> str:
    """A path that will be written into a script or log line: refused when it holds control characters (a
    newline would end the line, e.g. an `#SBATCH` one)."""
    text = str(path)
    if printable(text) != text:
        raise VitlabError(f"{what} {printable(text)!r} holds control characters; choose another folder")
    return text


def printable(text: Any) -> str:
    """`text` on one line: control and other invisible characters (newline, CR, tab, NUL, escape, U+2028,
    bidi overrides...) shown as Python escapes (`\\n`, `\\x1b`, `\\u202e`); everything else as it is."""
    text = str(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a string starting with = + - @ tab or CR gets a leading `'`
    (OWASP's CSV-injection advice), and a CR in it becomes a newline (the csv module quotes a cell holding a
    newline, but not one holding a lone CR, which a reader takes as the row's end); numbers and everything
    else pass unchanged."""
    if not isinstance(value, str):
        return value
    prefix = "'" if value[:1] in ("=", "+", "-", "@", "\t", "\r") else ""
    return prefix + value.replace("\r\n", "\n").replace("\r", "\n")


def atomic_write(path: str | Path, data: str | bytes, mode: int | None = None) -> Path:
    """Write `data` to a temporary file beside `path`, then rename it into place: readers (and a full disk)
    see the old file or the new one, never a part. `mode` (e.g. 0o755) is set before the rename."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    # mkstemp creates a new file exclusively (O_EXCL): a planted link at a guessable name is never written through
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        tmp.chmod(0o644 if mode is None else mode)  # mkstemp's 0600 would hide reports from other users
        os.replace(tmp, path)  # replaces a link at `path` itself, never its target
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
