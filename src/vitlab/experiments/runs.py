"""Reading run directories: the only input of collect, plot, compare and report (ARCHITECTURE principle 6).

A run directory is any folder holding `config.yaml` (written when a run starts); `results.json` appears
when it finishes and `metrics.jsonl` holds its per-batch and per-epoch records. Nothing here imports the
trainer or builds a model, so copied run directories can be analysed anywhere.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml

from ..errors import VitlabError


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
        return (self.results or {}).get("model") or self.config.get("model", {}).get("name", "?")

    @property
    def architecture(self) -> str:
        return (self.results or {}).get("architecture") or self.model

    @property
    def params(self) -> int | None:
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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """JSON lines; a torn last line (a run killed mid-write) is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def load_run(path: Path) -> Run:
    """The run at `path`; a damaged config.yaml or results.json is one line naming the file."""
    try:
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError):
        raise VitlabError(f"'{path / 'config.yaml'}' is not valid YAML (damaged?); repair or remove that run "
                          f"directory") from None
    results_file = path / "results.json"
    try:
        results = json.loads(results_file.read_text()) if results_file.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise VitlabError(f"'{results_file}' is not valid JSON (damaged?); delete it to treat the run as unfinished, "
                          f"or remove the run directory") from None
    if not isinstance(config, dict) or not isinstance(results, (dict, type(None))):
        raise VitlabError(f"'{path}' holds a config.yaml or results.json of the wrong shape; it is not a vitlab run")
    return Run(path, config, results)


def find_runs(dirs: list[str | Path], finished_only: bool = False) -> list[Run]:
    """Every run directory at or below `dirs`, sorted by path."""
    found: dict[Path, Run] = {}
    for d in map(Path, dirs):
        if not d.exists():
            raise VitlabError(f"'{d}' does not exist; pass run directories or folders that contain them")
        for cfg in sorted([d / "config.yaml"] if (d / "config.yaml").is_file() else d.rglob("config.yaml")):
            if any(part.startswith(".") for part in cfg.relative_to(d).parts):  # temporary / hidden folders
                continue
            run = load_run(cfg.parent)
            if run.finished or not finished_only:
                found[cfg.parent.resolve()] = run
    if not found:
        raise VitlabError(f"no run directories (folders with config.yaml) under {', '.join(map(str, dirs))}")
    return [found[k] for k in sorted(found)]
