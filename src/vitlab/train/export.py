"""What a finished run hands on: the by-architecture checkpoint layout and the files `--upload` sends.

`output.layout: by_architecture` (the layout of the classic-vs-differential project; the value's
old spelling is still accepted) adds, beside the task's run directories, the final weights and training log as

    <output.dir>/<task_name>/checkpoints/<architecture>/model_<run_id>_<size>_<dataset>.safetensors
    <output.dir>/<task_name>/checkpoints/<architecture>/model_<run_id>_<size>_<dataset>_training.log

with run_id = output.savefile and (architecture, size) from a sized name (`vit_classic_10m` -> vit_classic,
10M) or else the model's architecture label and its parameter count ("0.33M").
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..config import Config
from ..hub import HubTarget, upload_files
from ..registry import split_size
from .checkpoint import EMA_FILE, MODEL_FILE


def final_weights(run_dir: Path, results: dict[str, Any]) -> Path:
    """The weights the test numbers belong to: the EMA copy when the run kept one, else the last step's."""
    return run_dir / "checkpoints" / "last" / (EMA_FILE if results.get("weights") == "ema" else MODEL_FILE)


def by_architecture_names(results: dict[str, Any], run_id: str) -> tuple[str, str]:
    """(architecture folder, file stem) of the by-architecture layout."""
    arch, size = split_size(results["model"]) or (results["architecture"], f"{results['params'] / 1e6:.2f}M")
    dataset = results["dataset"].replace(":", "_").replace("/", "_")  # hf:owner/name -> hf_owner_name
    return arch, f"model_{run_id}_{size}_{dataset}"


def _copy_atomic(src: Path, dest: Path) -> None:
    """Copy through an exclusively created temporary sibling (never a planted link), then rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as source:
            shutil.copyfileobj(source, out)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def export_run(run_dir: Path, results: dict[str, Any], cfg: Config) -> dict[str, Path]:
    """Write the by-architecture layout when asked; return {path in the Hub repository: local file} for
    `--upload`: that layout's two files under <architecture>/, or the run's weights, config, results and logs under
    <task_name>/<savefile>/."""
    weights = final_weights(run_dir, results)
    if cfg.output.layout == "by_architecture":
        arch, stem = by_architecture_names(results, cfg.output.savefile)
        folder = run_dir.parent / "checkpoints" / arch
        files = {f"{arch}/{stem}.safetensors": folder / f"{stem}.safetensors",
                 f"{arch}/{stem}_training.log": folder / f"{stem}_training.log"}
        for src, dest in zip((weights, run_dir / "train.log"), files.values()):
            _copy_atomic(src, dest)
        return files
    base = f"{cfg.task_name}/{cfg.output.savefile}"
    files = {f"{base}/{MODEL_FILE}": weights}
    files.update({f"{base}/{name}": run_dir / name for name in ("config.yaml", "results.json", "metrics.jsonl",
                                                                 "train.log")})
    return files


def publish(cfg: Config, results: dict[str, Any], hub: HubTarget | None) -> None:
    """After training: write the by-architecture layout when asked, then upload the run's files when `hub` is set."""
    files = export_run(cfg.run_dir, results, cfg)
    if hub is not None:
        sent = upload_files(files, hub, f"vitlab: {cfg.task_name}/{cfg.output.savefile}")
        print(f"uploaded {len(sent)} files to {hub.repo_id}: {', '.join(sent)}", flush=True)
