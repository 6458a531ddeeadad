"""Reading run directories: the only input of collect, plot, compare and report (ARCHITECTURE principle 6).

A run directory is any folder holding `config.yaml` (written when a run starts); `results.json` appears
when it finishes and `metrics.jsonl` holds its per-batch and per-epoch records. Nothing here imports the
trainer or builds a model, so copied run directories can be analysed anywhere.

Run directories are not trusted (docs/design.md, threat model): they may come from a cluster, a colleague or a
download. Their files are read only as regular files inside the run (never through a symbolic link, a FIFO or
a device), with bounded sizes (config.yaml as `untrusted.load_yaml` allows, results.json 16 MiB, metrics.jsonl
its first GiB, 1 MiB a line); a folder tree is searched without following links and at most 32 folders deep.
A run whose config.yaml or results.json cannot be read is one line naming the file: `load_run` raises it, and
`find_runs` skips that run with a warning (the error itself when no run is left). Values of the wrong type are
dropped, not shown: results.json numbers that are strings, lists, booleans or not finite, metrics.jsonl lines
that are not JSON objects or hold such values (one warning per file; a torn last line, which a running or
killed run leaves, silently).
"""
from __future__ import annotations

import json
import math
import os
import stat
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

from .. import untrusted
from ..errors import VitlabError
from ..names import printable

MiB = 1 << 20
RESULTS_MAX_BYTES = 16 * MiB  # vitlab writes a few KiB
METRICS_MAX_BYTES = 1 << 30  # per-batch records of ~150 bytes: millions of steps; beyond, the first GiB is read
METRICS_MAX_LINE = 1 * MiB  # vitlab's records are well under 1 KiB
SCAN_MAX_DEPTH = 32  # folders below each given folder (a sweep's runs are 3-4 deep)
SCAN_MAX_FOLDERS = 500_000  # folders visited per given folder before the search stops, with a warning

#: results.json keys shown or plotted as numbers; anything else there is passed through untouched
RESULT_NUMBERS = ("test_top1", "test_top5", "test_loss", "test_samples", "params", "epochs", "train_seconds",
                  "images_per_second", "best_val_loss", "gflops", "peak_memory_mb", "train_memory_mb",
                  "world_size", "global_batch")
RESULT_FRACTIONS = ("test_top1", "test_top5")
RESULT_TEXTS = ("model", "architecture", "dataset", "device", "weights", "peak_memory_kind")
#: metrics.jsonl keys that must be numbers where a record has them (losses may be NaN: a diverged run)
METRIC_NUMBERS = ("epoch", "batch", "step", "loss", "acc", "lr", "val_loss", "val_top1", "val_top5")


def warn(message: str) -> None:
    """One line on stderr, for what is skipped but not fatal (the run files' text shown escaped)."""
    print(f"vitlab: warning: {printable(message)}", file=sys.stderr)


@dataclass
class Run:
    path: Path
    config: dict[str, Any]
    results: dict[str, Any] | None = None
    _metrics: list[dict[str, Any]] | None = field(default=None, repr=False)

    @property
    def finished(self) -> bool:
        return self.results is not None

    @cached_property
    def flat_config(self) -> dict[str, Any]:
        return flatten(self.config)

    @property
    def model(self) -> str:
        section = self.config.get("model")
        name = section.get("name") if isinstance(section, dict) else None
        return (self.results or {}).get("model") or (name if isinstance(name, str) and name else "?")

    @property
    def architecture(self) -> str:
        return (self.results or {}).get("architecture") or self.model

    @property
    def params(self) -> int | float | None:
        return (self.results or {}).get("params")

    @property
    def label(self) -> str:
        """A curve / bar label: the model name and its size."""
        return f"{self.model} ({self.params / 1e6:.2f}M)" if self.params else self.model

    @property
    def metrics(self) -> list[dict[str, Any]]:
        if self._metrics is None:
            self._metrics = read_jsonl(self.path / "metrics.jsonl")
        return self._metrics

    def records(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.metrics if r.get("kind") == kind]

    def series(self, kind: str, *keys: str) -> list[dict[str, Any]]:
        """The records of `kind` that hold every one of `keys` (what a curve needs to draw a point)."""
        return [r for r in self.records(kind) if all(k in r for k in keys)]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1e-3}} -> {'optim.lr': 1e-3}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _is_number(value: Any, finite: bool = True) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) or not finite
    except OverflowError:  # an integer beyond any float (10**400)
        return False


def _open(path: Path, what: str):
    """A binary file object of the regular file `path`, opened without following a link or blocking on a FIFO;
    FileNotFoundError when there is none, a VitlabError for a link, folder, FIFO or device."""
    untrusted.regular(path, what, None, allow_symlink=False)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:  # swapped for a link since the check (ELOOP), or unreadable
        raise VitlabError(f"{what} '{path}' cannot be opened ({exc.strerror}); it is not a file vitlab "
                          f"wrote") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise VitlabError(f"{what} '{path}' is not a regular file; vitlab reads only plain files in a run")
    return f


def _valid_metric(record: Any) -> bool:
    return isinstance(record, dict) and isinstance(record.get("kind", ""), str) and all(
        _is_number(record[k], finite=k in ("epoch", "batch", "step")) for k in METRIC_NUMBERS if k in record)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON-object lines of metrics.jsonl, read as an untrusted file (no links, FIFOs or devices; its first
    METRICS_MAX_BYTES, lines up to METRICS_MAX_LINE). A line that is not a JSON object, or holds a non-number
    where METRIC_NUMBERS go, is dropped with one warning for the file; a torn last line (a run killed, or still
    running, mid-write) is dropped silently. No file: no records."""
    try:
        f = _open(path, "metrics file")
    except FileNotFoundError:
        return []
    except VitlabError as exc:
        warn(f"{exc}; its curves are left out")
        return []
    records, bad, first_bad, read, number = [], 0, 0, 0, 0
    with f:
        while read < METRICS_MAX_BYTES:
            line = f.readline(min(METRICS_MAX_LINE + 1, METRICS_MAX_BYTES - read))
            if not line:
                break
            read += len(line)
            number += 1
            if len(line) > METRICS_MAX_LINE and not line.endswith(b"\n"):  # an overlong line: skip to its end
                while line and not line.endswith(b"\n") and read < METRICS_MAX_BYTES:
                    line = f.readline(min(MiB, METRICS_MAX_BYTES - read))
                    read += len(line)
                bad, first_bad = bad + 1, first_bad or number
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except (ValueError, RecursionError):  # not JSON, not UTF-8, nested too deep, a 5000-digit number
                if line.endswith(b"\n") or read >= METRICS_MAX_BYTES:
                    bad, first_bad = bad + 1, first_bad or number
                continue  # the torn last line: silently
            if _valid_metric(record):
                records.append(record)
            else:
                bad, first_bad = bad + 1, first_bad or number
        more = read >= METRICS_MAX_BYTES and f.read(1)
    if bad:
        warn(f"metrics file '{path}': skipped {bad} damaged line{'s' * (bad > 1)} (first: line {first_bad}; not "
             f"a JSON object of numbers)")
    if more:
        warn(f"metrics file '{path}' is larger than {METRICS_MAX_BYTES // MiB} MiB; only its first "
             f"{METRICS_MAX_BYTES // MiB} MiB were read")
    return records


def clean_results(results: dict[str, Any], path: Path) -> dict[str, Any]:
    """`results` without the values of known keys that have the wrong type (a string or list where a number
    goes, a number that is not finite or, for top-1/top-5, not a fraction; a non-text model name), one warning
    naming them; what is left is what collect, report and the plots can show."""
    dropped = []
    for key in RESULT_NUMBERS:
        value = results.get(key)
        if value is None:
            continue
        ok = _is_number(value, finite=not key.endswith("_loss"))
        if ok and key in RESULT_FRACTIONS:
            ok = 0.0 <= value <= 1.0
        elif ok and key == "params":
            ok = value > 0
        if not ok:
            dropped.append(key)
    dropped += [k for k in RESULT_TEXTS if results.get(k) is not None and not isinstance(results[k], str)]
    if dropped:
        warn(f"results file '{path}': ignored {', '.join(dropped)} (not {'a value' if len(dropped) > 1 else 'one'} "
             f"vitlab writes there)")
    return {k: v for k, v in results.items() if k not in dropped}


def load_run(path: Path) -> Run:
    """The run at `path`; a config.yaml or results.json that cannot be read (a link, FIFO, folder, too large,
    not UTF-8, not YAML / JSON, not a mapping) is one line naming the file."""
    config_file, results_file = path / "config.yaml", path / "results.json"
    try:
        text = untrusted.read_text(config_file, "run config", untrusted.YAML_MAX_CHARS, allow_symlink=False)
    except FileNotFoundError:
        raise VitlabError(f"'{path}' holds no config.yaml; it is not a vitlab run directory") from None
    config = untrusted.load_yaml(text, f"run config '{config_file}'")
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise VitlabError(f"run config '{config_file}' is a {type(config).__name__}, not a mapping (damaged?); "
                          f"repair or remove that run directory")
    try:
        data = untrusted.read_text(results_file, "results file", RESULTS_MAX_BYTES, allow_symlink=False)
    except FileNotFoundError:
        return Run(path, config, None)
    try:
        results = json.loads(data)
    except (ValueError, RecursionError):  # also a number of more than 4300 digits, or nesting beyond recursion
        raise VitlabError(f"'{results_file}' is not valid JSON (damaged?); delete it to treat the run as "
                          f"unfinished, or remove the run directory") from None
    if not isinstance(results, dict):
        raise VitlabError(f"'{results_file}' holds a JSON {type(results).__name__}, not an object (damaged?); "
                          f"delete it to treat the run as unfinished, or remove the run directory")
    return Run(path, config, clean_results(results, results_file))


def run_folders(root: Path) -> Iterator[Path]:
    """`root` itself when it holds a config.yaml (of any kind: a damaged one is reported, not passed over), else
    every folder below it that does, without following symbolic links, entering hidden folders (temporary
    ones), going more than SCAN_MAX_DEPTH deep or visiting more than SCAN_MAX_FOLDERS folders."""
    if os.path.lexists(root / "config.yaml"):
        yield root
        return
    stack, visited, too_deep = [(root, 0)], 0, False
    while stack:
        folder, depth = stack.pop()
        visited += 1
        if visited > SCAN_MAX_FOLDERS:
            warn(f"stopped searching '{root}' for runs after {SCAN_MAX_FOLDERS} folders; pass the run folders "
                 f"(or the sweep's folder) instead")
            return
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            warn(f"cannot list '{folder}' ({exc.strerror}); runs in it are left out")
            continue
        names = {e.name for e in entries}
        if folder != root and "config.yaml" in names:
            yield Path(folder)
        subfolders = sorted((e.name for e in entries if not e.name.startswith(".") and _is_real_dir(e)),
                            reverse=True)  # popped in name order
        if subfolders and depth >= SCAN_MAX_DEPTH:
            too_deep = True
            continue
        stack.extend((Path(folder) / name, depth + 1) for name in subfolders)
    if too_deep:
        warn(f"did not search more than {SCAN_MAX_DEPTH} folders deep below '{root}'; pass deeper run folders "
             f"themselves")


def _is_real_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


def find_runs(dirs: list[str | Path], finished_only: bool = False) -> list[Run]:
    """Every run directory at or below `dirs`, sorted by path. A run that cannot be read is skipped with a
    warning; when none can, the first one's reason is the error."""
    found: dict[Path, Run] = {}
    damaged: list[str] = []
    for d in map(Path, dirs):
        if not d.exists():
            raise VitlabError(f"'{d}' does not exist; pass run directories or folders that contain them")
        if not d.is_dir():
            raise VitlabError(f"'{d}' is a file, not a folder; pass run directories or folders that contain them")
        for folder in run_folders(d):
            try:
                run = load_run(folder)
            except VitlabError as exc:
                damaged.append(str(exc))
                continue
            if run.finished or not finished_only:
                found[folder.resolve()] = run
    if not found:
        if damaged:
            raise VitlabError(damaged[0] + (f" (and {len(damaged) - 1} more damaged runs)" if len(damaged) > 1
                                            else ""))
        raise VitlabError(f"no run directories (folders with config.yaml) under {', '.join(map(str, dirs))}")
    for reason in damaged:
        warn(f"skipped a run: {reason}")
    return [found[k] for k in sorted(found)]
