"""Experiment trackers behind one interface: `output.loggers: [tensorboard, csv, wandb, mlflow]`.

metrics.jsonl and train.log are always written (every vitlab tool reads them); trackers receive the same
records. Each gets the config when the run opens, every record (per-batch training values, validation, epoch
and test results) as it is written, and at the end the results and the run's files (config.yaml, results.json,
the final weights). Only rank 0 has a logger, so only rank 0 tracks.

  tensorboard  <run>/tb/ event files, scalars `<kind>/<key>` by optimizer step (the default)
  csv          <run>/csv/<kind>.csv, one row per record (train_batch.csv, epoch.csv, val_batch.csv, test.csv)
  wandb        Weights & Biases (`pip install 'vitlab[wandb]'`): project output.wandb_project (else the
               task name), the run's name; WANDB_MODE=offline, WANDB_ENTITY and the API key come from the
               environment, as wandb reads them. Records are logged against the optimizer step as their x-axis
               (`trainer/step`), so records written out of step order are kept.
  mlflow       MLflow (`pip install 'vitlab[mlflow]'`): the tracking URI from output.mlflow_tracking_uri, else
               MLFLOW_TRACKING_URI, else a SQLite store beside the runs (<output.dir>/mlflow.db, artifacts in
               <output.dir>/mlartifacts; `mlflow ui --backend-store-uri sqlite:///<output.dir>/mlflow.db`);
               the experiment is the task name.

A resumed run (`--reload`) continues the same tracked run: the W&B run id and MLflow run id are kept in
<run>/trackers.json. The CSV files, as metrics.jsonl, lose the rows after the checkpoint, whose batches are
replayed; W&B and MLflow histories cannot be rewritten, so after a hard kill the steps between the last
checkpoint and the kill appear there twice (a stop by signal saves first, and replays nothing).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ..errors import VitlabError
from ..names import atomic_write
from ..untrusted import read_bytes
from .metrics import kept_on_resume

STATE_FILE = "trackers.json"


class Tracker:
    """What a tracker is told; each method may be left as a no-op."""

    def log(self, kind: str, values: dict[str, Any], step: int) -> None:
        """One record: `kind` (train_batch, val_batch, epoch, test), its values, the optimizer step."""

    def finish(self, results: dict[str, Any], files: list[Path]) -> None:
        """The run's results and files, once, after testing."""

    def close(self, failed: bool = False) -> None:
        """End of this process's part: a finished or stopped run, or (`failed`) one that raised."""


def open_trackers(names: list[str], run_dir: Path, cfg, resumed: tuple[int, int] | None) -> list[Tracker]:
    """The trackers `names` for the run in `run_dir`; `resumed`: the (epoch, step) of the checkpoint a resumed
    run continues from, whose tracked runs it continues."""
    state = _read_state(run_dir / STATE_FILE) if resumed else {}
    build = {"tensorboard": TensorBoard, "csv": CSVFiles, "wandb": WandB, "mlflow": MLflow}
    trackers: list[Tracker] = []
    for name in names:
        try:
            trackers.append(build[name](run_dir, cfg, state, resumed))
        except Exception as exc:  # noqa: BLE001  (a store that cannot be opened, a server out of reach, ...)
            for opened in trackers:
                opened.close(failed=True)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise VitlabError(f"output.loggers: {name} could not start ({type(exc).__name__}: {first}); fix its "
                              f"settings or leave {name} out of output.loggers") from None
    if state:  # the tracked runs' ids, for a resume
        atomic_write(run_dir / STATE_FILE, json.dumps(state, indent=2) + "\n")
    return trackers


def _read_state(path: Path) -> dict[str, str]:
    """trackers.json of the run being resumed: {tracker: run id}; one line when it is not what vitlab wrote."""
    if not path.is_file():
        return {}
    try:
        state = json.loads(read_bytes(path, "trackers.json", limit=1 << 16).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        state = None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in state.items()):
        raise VitlabError(f"'{path}' is damaged (not the tracked runs' ids vitlab writes); delete it to resume into "
                          f"new W&B / MLflow runs")
    return state


def _numbers(values: dict[str, Any]) -> dict[str, float]:
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{section: {key: v}} as {"section.key": v}: the config as parameters."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class TensorBoard(Tracker):
    def __init__(self, run_dir: Path, cfg, state: dict, resumed: tuple[int, int] | None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tb"))

    def log(self, kind: str, values: dict[str, Any], step: int) -> None:
        for k, v in _numbers(values).items():
            if k not in ("step", "epoch", "batch"):
                self.writer.add_scalar(f"{kind}/{k}", v, step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class CSVFiles(Tracker):
    """One file per record kind; its columns are fixed by its first row (a resumed run keeps the header, and
    the rows after its checkpoint are dropped, as in metrics.jsonl)."""

    def __init__(self, run_dir: Path, cfg, state: dict, resumed: tuple[int, int] | None):
        self.dir = run_dir / "csv"
        self.dir.mkdir(exist_ok=True)
        self.files: dict[str, tuple[Any, csv.DictWriter]] = {}
        if resumed:
            for path in self.dir.glob("*.csv"):
                _truncate(path, *resumed)

    def log(self, kind: str, values: dict[str, Any], step: int) -> None:
        if kind not in self.files:
            path = self.dir / f"{kind}.csv"
            header = None
            if path.is_file() and path.stat().st_size:
                with open(path, newline="") as f:
                    header = next(csv.reader(f), None)
            f = open(path, "a" if header else "w", newline="", buffering=1)
            writer = csv.DictWriter(f, fieldnames=header or list(values), extrasaction="ignore")
            if not header:
                writer.writeheader()
            self.files[kind] = (f, writer)
        self.files[kind][1].writerow(values)

    def close(self, failed: bool = False) -> None:
        for f, _ in self.files.values():
            f.close()
        self.files.clear()


def _truncate(path: Path, epoch: int, step: int) -> None:
    """Keep the rows metrics.jsonl keeps on a resume at (epoch, step): epochs done, batches up to the step."""
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows, header = list(reader), reader.fieldnames
    if not header:
        return
    def number(row: dict, key: str, default: int) -> int:
        try:
            return int(row.get(key) or default)
        except ValueError:
            return default
    whole = [r for r in rows if None not in r and None not in r.values()]  # a row torn by a kill is dropped
    kept = [r for r in whole
            if kept_on_resume(path.stem, number(r, "epoch", 0), number(r, "step", step + 1), epoch, step)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=header)
    writer.writeheader()
    writer.writerows(kept)
    atomic_write(path, buffer.getvalue())


class WandB(Tracker):
    def __init__(self, run_dir: Path, cfg, state: dict, resumed: tuple[int, int] | None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=cfg.output.wandb_project or cfg.task_name, name=run_dir.name,
                              id=state.get("wandb"), resume="allow", dir=str(run_dir), config=cfg.to_dict())
        state["wandb"] = self.run.id
        self.run.define_metric("trainer/step")
        self.run.define_metric("*", step_metric="trainer/step")

    def log(self, kind: str, values: dict[str, Any], step: int) -> None:
        self.run.log({"trainer/step": step, **{f"{kind}/{k}": v for k, v in _numbers(values).items()
                                               if k != "step"}})

    def finish(self, results: dict[str, Any], files: list[Path]) -> None:
        self.run.summary.update(_numbers(results))
        artifact = self.wandb.Artifact(f"run-{self.run.id}", type="model")
        for path in files:
            artifact.add_file(str(path), name=path.name)
        self.run.log_artifact(artifact)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


@contextlib.contextmanager
def _start_quickly():
    """MLflow's HTTP client retries a refused connection for minutes (7 tries, 120 s timeouts): while the
    tracker starts, one retry and 10 s timeouts, so a server out of reach is one line within seconds (a
    rate-limited one gets its second chance). Later calls keep MLflow's retries (a blip mid-run); values the
    user set are kept."""
    keys = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: v for k, v in keys.items() if saved[k] is None})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


class MLflow(Tracker):
    def __init__(self, run_dir: Path, cfg, state: dict, resumed: tuple[int, int] | None):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)  # "Creating initial tables..."
        uri = cfg.output.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None  # a tracking server or a user's store keeps artifacts where it is set up to
        if not uri:  # a local store beside the runs
            root = Path(cfg.output.dir).resolve()
            root.mkdir(parents=True, exist_ok=True)
            uri, artifacts = f"sqlite:///{root / 'mlflow.db'}", (root / "mlartifacts").as_uri()
        self.client, self.pending, self.finished = MlflowClient(tracking_uri=uri), [], False
        with _start_quickly():
            if state.get("mlflow"):  # a resume: the same run, running again
                self.run_id = state["mlflow"]
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                experiment = self.client.get_experiment_by_name(cfg.task_name)
                experiment_id = (experiment.experiment_id if experiment else
                                 self.client.create_experiment(cfg.task_name, artifact_location=artifacts))
                self.run_id = self.client.create_run(experiment_id, run_name=run_dir.name).info.run_id
                params = [Param(k, (v if isinstance(v, str) else json.dumps(v))[:6000])  # MLflow's value limit
                          for k, v in _flat(cfg.to_dict()).items()]
                for start in range(0, len(params), 100):  # at most 100 parameters a call
                    self.client.log_batch(self.run_id, params=params[start:start + 100])
        state["mlflow"] = self.run_id

    def log(self, kind: str, values: dict[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(f"{kind}/{k}", float(v), now, step) for k, v in _numbers(values).items()
                         if k not in ("step", "epoch", "batch")]
        if len(self.pending) >= 1000 or kind != "train_batch":  # per-batch values go in batches
            self._flush()

    def _flush(self) -> None:
        for start in range(0, len(self.pending), 1000):  # at most 1000 metrics a call
            self.client.log_batch(self.run_id, metrics=self.pending[start:start + 1000])
        self.pending = []

    def finish(self, results: dict[str, Any], files: list[Path]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(f"results/{k}", float(v), now, 0) for k, v in _numbers(results).items()]
        self._flush()
        for path in files:
            self.client.log_artifact(self.run_id, str(path))
        self.finished = True

    def close(self, failed: bool = False) -> None:
        self._flush()
        status = "FAILED" if failed else "FINISHED" if self.finished else "KILLED"
        self.client.set_terminated(self.run_id, status=status)
