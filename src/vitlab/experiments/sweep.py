"""`vitlab sweep SPEC.yaml`: one run directory per point of a grid, run here or handed to torchrun / SLURM.

    base: configs/quickstart.yaml      # a config file (relative to the working directory or to the spec)
    set: {train.epochs: 20}            # optional: fixed overrides for every point
    grid:                              # dotted key -> values; the points are the Cartesian product
      optim.lr: [1.0e-3, 3.0e-3]
      model.depth: [3, 6]
    zip:                               # optional: lists of one length, varied together (one more grid axis)
      model.name: [vit_micro_patch7_28, diff_vit_micro_patch7_28]
      model.embed_dim: [64, 64]
      name: [classic, differential]    # optional: the zip rows' names (else built from their values)

Runs go to <output>/<point name> (default output: output/sweeps/<spec name>), with readable, stable names
built from the varying values: `depth-3_lr-0.001`. Every launch passes --reload, so calling the sweep again
skips finished points (results.json present), resumes interrupted ones from their last checkpoint and starts
the rest. `local` runs the points one after another, each in its own process (clean per-run peak memory, and
a crash cannot take the sweep's state with it).
"""
from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config import as_number, read_yaml
from ..errors import VitlabError
from ..names import atomic_write, check_path_text, safe_name
from ..presets import config_file
from ..resolve import build

SPEC_KEYS = {"base", "set", "grid", "zip", "name"}


@dataclass
class Point:
    name: str
    overrides: dict[str, Any]  # the point's own values (grid + zip), in spec order
    base: Path | None = None  # its own config file (compare); None: the sweep's

    def status(self, root: Path) -> str:
        run = root / self.name
        if (run / "results.json").is_file():
            return "finished"
        return "resume" if (run / "checkpoints" / "last").is_dir() else "new"


@dataclass
class Sweep:
    name: str
    base: Path
    fixed: dict[str, Any]
    points: list[Point]

    def train_args(self, point: Point, root: Path) -> list[str]:
        """`vitlab train` arguments for one point (the run dir is root/<point name>)."""
        root = sweep_folder(root)
        values = {**self.fixed, **point.overrides, "task_name": root.name, "output.dir": str(root.parent),
                  "output.savefile": safe_name(point.name, "a sweep point's name", "depth-3")}
        overrides = [f"{k}={_yaml_scalar(v)}" for k, v in values.items()]
        return ["--config", str(point.base or self.base), "--reload", *overrides]


def sweep_folder(root: str | Path) -> Path:
    """The folder of a sweep's runs, as passed to each run: its last component is the runs' task_name (one plain
    folder name), and its path goes into scripts, so it holds no control character."""
    root = Path(root)
    if root.name in ("", ".", ".."):  # `--output .`: name the folder itself
        root = Path(os.path.abspath(root))
    check_path_text(root, "the sweep's folder (--output)")
    safe_name(root.name, "the sweep's folder (--output) is every run's task_name; it", "sweeps_01")
    return root


def _yaml_scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10 ** 6).strip().removesuffix("\n...").strip()


def load_spec(path: str | Path) -> Sweep:
    path = config_file(path)  # a file, or a preset's name
    spec = read_yaml(path)
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise VitlabError(f"sweep spec '{path}': unknown key(s) {', '.join(sorted(unknown))}; a spec has "
                          f"{', '.join(sorted(SPEC_KEYS))}")
    if "base" not in spec:
        raise VitlabError(f"sweep spec '{path}' needs `base: <config.yaml>`")
    base = Path(spec["base"])
    if not base.is_file():  # relative to the spec, else a preset's name
        base = path.parent / base if (path.parent / base).is_file() else config_file(base)
    grid, zipped, fixed = spec.get("grid") or {}, spec.get("zip") or {}, spec.get("set") or {}
    for section, value in (("grid", grid), ("zip", zipped), ("set", fixed)):
        if not isinstance(value, dict):
            raise VitlabError(f"sweep spec '{path}': `{section}` must map dotted config keys to values")
    for key, values in {**grid, **zipped}.items():
        if not isinstance(values, list) or not values:
            raise VitlabError(f"sweep spec '{path}': `{key}` must list one or more values, got {values!r}")
    # YAML 1.1 reads 3e-3 as a string; the config does not, so neither does the spec.
    fixed = {k: as_number(v) for k, v in fixed.items()}
    grid, zipped = ({k: [as_number(x) for x in v] for k, v in d.items()} for d in (grid, zipped))
    lengths = {len(v) for v in zipped.values()}
    if len(lengths) > 1:
        raise VitlabError(f"sweep spec '{path}': the `zip` lists must have one length, got "
                          + ", ".join(f"{k}: {len(v)}" for k, v in zipped.items()))
    # names given to the zip rows: checked here, not when the row trains
    labels = [safe_name(x, f"sweep spec '{path}': zip row name", "classic") for x in zipped.pop("name", [])]
    zip_rows = [dict(zip(zipped, row)) for row in zip(*zipped.values())] or [{}]
    grid_rows = [dict(zip(grid, row)) for row in itertools.product(*grid.values())]
    short = _short_names([*zipped, *grid])

    def name_of(i: int, z: dict[str, Any], g: dict[str, Any]) -> str:
        head = labels[i] if labels else point_name(z, short, "")
        return "_".join(filter(None, [head, point_name(g, short, "")])) or "base"
    named = [Point(name_of(i, z, g), {**z, **g}) for i, z in enumerate(zip_rows) for g in grid_rows]
    names = [p.name for p in named]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise VitlabError(f"sweep spec '{path}': two points are both named '{dup}'; make the values distinct")
    for p in named:
        safe_name(p.name, f"sweep spec '{path}': point name", "depth-3")
    sweep = Sweep(safe_name(spec.get("name") or path.stem, f"sweep spec '{path}': `name` (or the file name)",
                            "quickstart_2x2"), base, fixed, named)
    tree = read_yaml(base)
    for p in named:  # every point's config is checked before anything runs
        build(tree, [*fixed.items(), *p.overrides.items()])
    return sweep


def _short_names(keys: list[str]) -> dict[str, str]:
    """Last key component when unambiguous ('optim.lr' -> 'lr'), else the full key with '_' for '.'."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k.replace(".", "_")) for k, s in zip(keys, last)}


def point_name(values: dict[str, Any], short: dict[str, str], empty: str = "base") -> str:
    parts = [f"{short[k]}-{_slug(v)}" for k, v in values.items()]
    return "_".join(parts) or empty


def _slug(value: Any) -> str:
    text = _yaml_scalar(value) if not isinstance(value, str) else value
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "none"


def run_local(sweep: Sweep, root: Path) -> list[tuple[Point, str]]:
    """Run the unfinished points one after another; returns (point, what happened). A point counts as done only
    when its run wrote results.json: a training stopped by a signal (it exits 0 or 75 with its checkpoint
    saved), killed, or failing ends the sweep here with one line (TrainingStopped / VitlabError), and the next
    call resumes that point."""
    outcome = []
    for i, point in enumerate(sweep.points, 1):
        status = point.status(root)
        print(f"[{i}/{len(sweep.points)}] {point.name}: "
              + {"finished": "finished, skipped", "resume": "resuming", "new": "training"}[status], flush=True)
        if status != "finished":
            cmd = [sys.executable, "-m", "vitlab", "train", *sweep.train_args(point, root)]
            code, received = _train(cmd)
            _check_point(sweep, point, root, i, code, received)
        outcome.append((point, status))
    return outcome


def _train(cmd: list[str]) -> tuple[int, int | None]:
    """Run one point's training in its own process group and wait for it: (its exit code, the stop signal this
    sweep received meanwhile, or None). SIGTERM, SIGINT and SIGUSR1 sent to the sweep (`kill`, Ctrl-C, SLURM)
    are passed on to the training, once each, which saves and stops as it does alone; a terminal's Ctrl-C
    reaches the training only this way, so never twice (a second one would kill it mid-save)."""
    import signal
    import threading

    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
    proc = subprocess.Popen(cmd, **group)
    if threading.current_thread() is not threading.main_thread():
        return proc.wait(), None
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        if proc.poll() is None:
            proc.send_signal(signum)

    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    previous = {sig: signal.signal(sig, forward) for sig in stops}
    try:
        code = proc.wait()  # a handler that returns does not interrupt the wait (PEP 475)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return code, (received[0] if received else None)


def _check_point(sweep: Sweep, point: Point, root: Path, i: int, code: int, received: int | None) -> None:
    """Raise unless the point's run finished and the sweep may go on to the next one."""
    import signal

    from ..errors import TrainingStopped
    finished = point.status(root) == "finished"
    where = f"run '{point.name}' ({i} of {len(sweep.points)})"
    again = "call the sweep again: finished runs are skipped, this one resumes from its last checkpoint"
    if code == 0 and finished and received is None:
        return
    if received is not None:
        why = f"sweep {sweep.name} stopped by {signal.Signals(received).name} at {where}"
    elif code < 0:
        why = f"sweep {sweep.name} stopped: {where} was killed by {_signal_name(-code)} before it finished"
    elif code in (0, 75, 130):  # stopped by a signal sent to the training: saved, not finished
        why = f"sweep {sweep.name} stopped: {where} was stopped by a signal before it finished"
    else:
        raise VitlabError(f"run '{point.name}' failed (exit {code}); fix it and call the sweep again: "
                          f"finished runs are skipped, this one resumes")
    if finished:
        why += " (that run had finished)"
    # not done: a wrapper reads 75 as 'run again' (SIGINT keeps 130, a kill the shell's 128+N)
    exit_code = 130 if received == signal.SIGINT or code == 130 else 128 - code if code < 0 else 75
    raise TrainingStopped(f"{why}; {again}", exit_code)


def _signal_name(signum: int) -> str:
    import signal
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _pending(sweep: Sweep, root: Path) -> list[Point]:
    pending = [p for p in sweep.points if p.status(root) != "finished"]
    if not pending:
        raise VitlabError(f"every run of sweep '{sweep.name}' under {root} is finished; nothing to launch")
    return pending


def write_torchrun(sweep: Sweep, root: Path) -> Path:
    pending = _pending(sweep, root)
    lines = ["#!/usr/bin/env bash",
             f"# vitlab sweep {shlex.quote(sweep.name)}: {len(pending)} unfinished of {len(sweep.points)} runs, "
             "one after",
             "# another, each data-parallel over this node's GPUs (NPROC=... to choose). Rerunnable: --reload.",
             "set -euo pipefail",
             'NPROC="${NPROC:-$(python3 -c \'import torch; print(max(torch.cuda.device_count(), 1))\')}"']
    for p in pending:
        args = " ".join(shlex.quote(a) for a in sweep.train_args(p, root))
        lines.append(f'torchrun --standalone --nproc_per_node="$NPROC" -m vitlab train {args}')
    return _write_script(root / "sweep_torchrun.sh", lines)


def write_slurm(sweep: Sweep, root: Path) -> Path:
    pending = _pending(sweep, root)
    lines = ["#!/usr/bin/env bash",
             f"# vitlab sweep {shlex.quote(sweep.name)}: a job array, one task per unfinished run ({len(pending)} of "
             f"{len(sweep.points)}).",
             "# Edit the resources for your cluster; each array task is one (data-parallel) training run.",
             f"#SBATCH --job-name={shlex.quote(sweep.name)}",
             f"#SBATCH --array=0-{len(pending) - 1}",
             "#SBATCH --nodes=1",
             "#SBATCH --ntasks-per-node=1",
             "#SBATCH --gpus-per-task=1",
             "#SBATCH --cpus-per-task=8",
             "#SBATCH --time=24:00:00",
             f"#SBATCH --output={shlex.quote(str(sweep_folder(root) / 'slurm-%A_%a.out'))}",
             "set -euo pipefail",
             'cd "${SLURM_SUBMIT_DIR:-.}"',
             'PYTHON="${PYTHON:-python3}"',
             '[ -x .venv/bin/python ] && PYTHON=.venv/bin/python',
             "RUNS=("]
    lines += [f"  {shlex.quote(' '.join(shlex.quote(a) for a in sweep.train_args(p, root)))}" for p in pending]
    lines += [")", 'eval "set -- ${RUNS[$SLURM_ARRAY_TASK_ID]}"',
              'srun --kill-on-bad-exit=1 "$PYTHON" -m vitlab train "$@"']
    return _write_script(root / "sweep.sbatch", lines)


def _write_script(path: Path, lines: list[str]) -> Path:
    """Every line is one line (the names and paths in it were checked for control characters), written
    whole or not at all."""
    for line in lines:
        check_path_text(line, "a line of the launch script")
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, "\n".join(lines) + "\n", mode=0o755)


def submit(script: Path, launcher: str) -> None:
    tool = "sbatch" if launcher == "slurm" else "bash"
    if shutil.which(tool) is None:
        raise VitlabError(f"`{tool}` is not on PATH; run {script} where {tool} is available")
    code = subprocess.call([tool, str(script)])
    if code != 0:
        raise VitlabError(f"`{tool} {script}` failed (exit {code})")
