"""The presets: every recipe and sweep spec vitlab ships, as package data (`vitlab/configs/`).

They travel inside the wheel, so `--config quickstart`, `vitlab sweep gdt/learned_clutter` and the original
projects' command lines work from an installed package, not only from a checkout (where `configs/` is a link to
the same folder). A name is the file's path under `configs/` without `.yaml`; `configs/quickstart.yaml`, the
spelling of the checkout's commands, names the same preset. A file that exists on disk always wins over a
preset of the same name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .errors import VitlabError

PRESETS = Path(__file__).resolve().parent / "configs"


@dataclass
class Preset:
    name: str  # e.g. "gdt/learned_clutter"
    path: Path
    kind: str  # "config" (vitlab train --config NAME) or "sweep" (vitlab sweep NAME)
    summary: str  # the file's first comment line that is not a command


def preset_path(name: str | Path) -> Path | None:
    """The shipped file `name` stands for (`quickstart`, `quickstart.yaml`, `configs/quickstart.yaml`), or None.
    A name never leaves the presets' folder (`..`, absolute paths and links out are not presets)."""
    text = str(name).replace("\\", "/").removeprefix("./").removeprefix("configs/")
    if not text or text.startswith("/") or ".." in text.split("/"):
        return None
    for candidate in (text, f"{text}.yaml"):
        path = (PRESETS / candidate).resolve()
        if path.suffix == ".yaml" and path.is_file() and path.is_relative_to(PRESETS):
            return path
    return None


def config_file(path: str | Path) -> Path:
    """A config or sweep spec as a file: `path` itself when it is a file, else the preset it names (a folder
    of the same name, such as a dataset's, does not hide a preset). A path that is neither is returned as it
    is (the reader says what is wrong, and names `vitlab configs`)."""
    path = Path(path)
    if path.is_file():
        return path
    return preset_path(path) or path


def presets() -> list[Preset]:
    """Every shipped preset, sorted by name."""
    from .config import read_yaml

    found = []
    for path in sorted(PRESETS.rglob("*.yaml")):
        tree = read_yaml(path)
        kind = "sweep" if "base" in tree else "config"  # a sweep spec names its base config
        found.append(Preset(path.relative_to(PRESETS).with_suffix("").as_posix(), path, kind, _summary(path)))
    return found


def _summary(path: Path) -> str:
    """The first comment line that says what the file is, not how to run it (cut at 100 characters)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("# ").strip()
        command = text.startswith(("vitlab ", "python ", "then:", "needs:")) or re.match(r"make [\w-]+\s*(\(|$)", text)
        if text and not command:
            return text if len(text) <= 100 else text[:99] + "…"
    return ""


def preset_table(pattern: str = "*") -> str:
    """`vitlab configs [PATTERN]`: name, kind and summary of each preset whose name matches the shell pattern."""
    from fnmatch import fnmatch

    rows = [p for p in presets() if fnmatch(p.name, pattern) or fnmatch(p.name, f"*{pattern}*")]
    if not rows:
        raise VitlabError(f"no preset matches '{pattern}'; `vitlab configs` lists them all")
    width = max(len(p.name) for p in rows)
    return "\n".join(f"{p.name:<{width}}  {p.kind:<6}  {p.summary}".rstrip() for p in rows)
