"""output.loggers: TensorBoard, CSV, Weights & Biases and MLflow, each through its real library, offline.

W&B runs in offline mode and is read back from the run file it writes (its records are protobuf messages in a
LevelDB-style log); MLflow writes a local SQLite store, read back with its own client. Each test trains a tiny
model on the embedded digits and checks the tracker against metrics.jsonl, which every run writes."""
import json
import struct
from pathlib import Path

import pytest

from conftest import QUICK, run_cli

TRAIN = ["train", *QUICK, "train.epochs=1", "train.log_every=5", "data.max_train_samples=320"]


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def train(capsys, tmp_path, *extra: str) -> Path:
    code, _, err = run_cli([*TRAIN, "--output", str(tmp_path), *extra], capsys)
    assert code == 0, err
    return next(tmp_path.rglob("results.json")).parent


def test_csv_and_tensorboard_hold_every_record(capsys, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = train(capsys, tmp_path, "output.loggers=[tensorboard,csv]", "output.tensorboard=true")
    for kind in ("train_batch", "epoch", "test"):
        import csv
        with open(run_dir / "csv" / f"{kind}.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        expected = records(run_dir, kind)
        assert len(rows) == len(expected) > 0
        assert [float(r["loss" if kind != "epoch" else "val_loss"]) for r in rows] == \
            [r["loss" if kind != "epoch" else "val_loss"] for r in expected]
    events = EventAccumulator(str(run_dir / "tb")).Reload()
    losses = events.Scalars("train_batch/loss")
    assert [e.step for e in losses] == [r["step"] for r in records(run_dir, "train_batch")]


def test_tensorboard_false_leaves_it_out(capsys, tmp_path):
    run_dir = train(capsys, tmp_path, "output.loggers=[tensorboard,csv]", "output.tensorboard=false")
    assert not (run_dir / "tb").exists() and (run_dir / "csv" / "epoch.csv").is_file()


# -- Weights & Biases ----------------------------------------------------------------------------------------
@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CACHE_DIR": tmp_path / "wb_cache",
                       "WANDB_CONFIG_DIR": tmp_path / "wb_config", "WANDB_DATA_DIR": tmp_path / "wb_data"}.items():
        monkeypatch.setenv(key, str(value))


def wandb_records(run_file: Path) -> list:
    """The protobuf records of an offline W&B run file: a 7-byte header, then LevelDB log blocks of 32 KiB,
    each record a 7-byte header (CRC, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, part, out = run_file.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
            part = b""
    return out


def wandb_run(run_dir: Path) -> dict:
    """{id, config, history: [{key: value}], summary: {key: value}, artifacts: [names]} of every offline run
    file under run_dir/wandb (a resumed run has one file per process)."""
    out = {"ids": set(), "config": {}, "history": [], "summary": {}, "artifacts": []}
    for run_file in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        for r in wandb_records(run_file):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                out["ids"].add(r.run.run_id)
                out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "config":
                out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
            elif kind == "history":
                out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in r.history.item})
            elif kind == "summary":
                out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in r.summary.update})
            elif kind == "artifact":
                out["artifacts"].append((r.artifact.name, sorted(e.path for e in r.artifact.manifest.contents)))
    return out


def test_wandb_offline_logs_config_batches_results_and_files(capsys, tmp_path, wandb_offline):
    run_dir = train(capsys, tmp_path, "output.loggers=[wandb]", "output.wandb_project=vitlab-tests")
    run = wandb_run(run_dir)
    assert len(run["ids"]) == 1 and json.loads((run_dir / "trackers.json").read_text())["wandb"] in run["ids"]
    assert run["config"]["model"]["name"] == "vit_micro_patch2_8" and run["config"]["train"]["epochs"] == 1
    batches = [h for h in run["history"] if "train_batch/loss" in h]
    assert [(h["trainer/step"], h["train_batch/loss"]) for h in batches] == \
        [(r["step"], r["loss"]) for r in records(run_dir, "train_batch")]
    results = json.loads((run_dir / "results.json").read_text())
    assert run["summary"]["test_top1"] == results["test_top1"]
    assert run["artifacts"] and {"config.yaml", "results.json", "model.safetensors"} <= set(run["artifacts"][0][1])


def test_wandb_resume_continues_the_same_run(capsys, tmp_path, wandb_offline):
    run_dir = train(capsys, tmp_path, "output.loggers=[wandb]")
    first = json.loads((run_dir / "trackers.json").read_text())["wandb"]
    code, _, err = run_cli([*TRAIN, "--output", str(tmp_path), "output.loggers=[wandb]", "train.epochs=2",
                            "--reload"], capsys)
    assert code == 0, err
    run = wandb_run(run_dir)
    assert run["ids"] == {first} and len(list((run_dir / "wandb").glob("offline-run-*"))) == 2
    steps = [h["trainer/step"] for h in run["history"] if "train_batch/loss" in h]
    assert steps == [r["step"] for r in records(run_dir, "train_batch")] == list(range(1, len(steps) + 1))


# -- MLflow ----------------------------------------------------------------------------------------------------
@pytest.fixture
def mlflow_client(monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def client(output: Path):
        from mlflow.tracking import MlflowClient
        return MlflowClient(tracking_uri=f"sqlite:///{output.resolve() / 'mlflow.db'}")
    return client


def test_mlflow_logs_params_metrics_results_and_files(capsys, tmp_path, mlflow_client):
    run_dir = train(capsys, tmp_path, "output.loggers=[mlflow]")
    client = mlflow_client(tmp_path)
    run = client.get_run(json.loads((run_dir / "trackers.json").read_text())["mlflow"])
    assert run.info.status == "FINISHED" and run.info.run_name == run_dir.name
    assert run.data.params["model.name"] == "vit_micro_patch2_8" and run.data.params["train.epochs"] == "1"
    history = client.get_metric_history(run.info.run_id, "train_batch/loss")
    assert sorted((m.step, m.value) for m in history) == [(r["step"], r["loss"]) for r in records(run_dir, "train_batch")]
    results = json.loads((run_dir / "results.json").read_text())
    assert run.data.metrics["results/test_top1"] == results["test_top1"]
    assert {"config.yaml", "results.json", "model.safetensors"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts beside the runs, not in the working directory


def test_mlflow_resume_continues_the_same_run(capsys, tmp_path, mlflow_client):
    run_dir = train(capsys, tmp_path, "output.loggers=[mlflow]")
    code, _, err = run_cli([*TRAIN, "--output", str(tmp_path), "output.loggers=[mlflow]", "train.epochs=2",
                            "--reload"], capsys)
    assert code == 0, err
    client = mlflow_client(tmp_path)
    assert len(client.search_runs([client.get_experiment_by_name("vitlab").experiment_id])) == 1
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train_batch/loss"))
    assert steps == [r["step"] for r in records(run_dir, "train_batch")] == list(range(1, len(steps) + 1))
    assert len(client.get_metric_history(run_id, "epoch/val_loss")) == 2


# -- bad cases -------------------------------------------------------------------------------------------------
def test_unknown_logger_and_missing_package_are_one_line(capsys, tmp_path, monkeypatch):
    code, _, err = run_cli([*TRAIN, "--output", str(tmp_path), "output.loggers=[tensorboard,neptune]"], capsys)
    assert code == 2 and err.count("\n") == 1 and "output.loggers" in err
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    code, _, err = run_cli([*TRAIN, "--output", str(tmp_path), "output.loggers=[wandb]"], capsys)
    assert code == 2 and err.count("\n") == 1 and "pip install 'vitlab[wandb]'" in err
    assert not list(tmp_path.rglob("metrics.jsonl"))  # refused before the run started
    from vitlab.config import load_config
    load_config(None, ["output.loggers=[wandb]"])  # a W&B run's config still builds (evaluate, push, collect)
    code, _, err = run_cli([*TRAIN, "--output", str(tmp_path), "output.mlflow_tracking_uri=http://u:secret@host"],
                           capsys)
    assert code == 2 and err.count("\n") == 1 and "MLFLOW_TRACKING_URI" in err and "secret" not in err
    from vitlab.errors import VitlabError
    with pytest.raises(VitlabError, match="password or token"):
        load_config(None, ["output.mlflow_tracking_uri=https://host/api?token=abc"])
    for fine in ("postgresql://bob@db/mlflow", "file:///runs@v2/mlruns", "databricks://profile", "sqlite:///a@b.db"):
        load_config(None, [f"output.mlflow_tracking_uri={fine}"])  # a user without a password, an @ in a path


def test_a_failing_tracker_never_ends_the_run(capsys, tmp_path, monkeypatch):
    from vitlab.train import trackers

    def broken(self, kind, values, step):
        raise OSError("disk full")
    monkeypatch.setattr(trackers.CSVFiles, "log", broken)
    run_dir = train(capsys, tmp_path, "output.loggers=[csv]")
    log = (run_dir / "train.log").read_text()
    assert log.count("logger CSVFiles stopped (OSError: disk full)") == 1
    assert records(run_dir, "test")  # trained and tested to the end


def test_csv_rows_after_the_checkpoint_are_dropped_on_resume(capsys, tmp_path):
    """A hard kill leaves rows the resumed run replays: the CSV files are cut back as metrics.jsonl is."""
    run_dir = train(capsys, tmp_path, "output.loggers=[csv]")
    with open(run_dir / "csv" / "train_batch.csv", "a") as f:  # what a killed second epoch had written
        f.write("2,1,999,9.0,0.0,0.001\n")
    (run_dir / "results.json").unlink()  # as if killed before testing
    code, _, err = run_cli([*TRAIN, "--output", str(tmp_path), "output.loggers=[csv]", "train.epochs=2",
                            "--reload"], capsys)
    assert code == 0, err
    import csv
    with open(run_dir / "csv" / "train_batch.csv", newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f)]
    assert steps == [r["step"] for r in records(run_dir, "train_batch")] == list(range(1, len(steps) + 1))
    assert "trackers.json" not in {p.name for p in run_dir.iterdir()}  # nothing to continue: no ids file


def test_damaged_tracker_ids_are_one_line_on_resume(capsys, tmp_path, mlflow_client):
    run_dir = train(capsys, tmp_path, "output.loggers=[mlflow]")
    (run_dir / "trackers.json").write_text("[1, 2")
    code, _, err = run_cli([*TRAIN, "--output", str(tmp_path), "output.loggers=[mlflow]", "train.epochs=2",
                            "--reload"], capsys)
    assert code == 2 and err.count("\n") == 1 and "trackers.json' is damaged" in err


def test_a_run_that_raises_is_marked_failed(tmp_path, mlflow_client, monkeypatch):
    from vitlab.config import load_config
    from vitlab.train import train as train_run
    from vitlab.train.trainer import Trainer

    def broken(self, seconds, images):
        raise RuntimeError("out of memory")
    monkeypatch.setattr(Trainer, "_end_epoch", broken)
    cfg = load_config(None, [*QUICK, "train.epochs=1", f"output.dir={tmp_path}", "output.loggers=[mlflow]"])
    with pytest.raises(RuntimeError, match="out of memory"):
        train_run(cfg)
    client = mlflow_client(tmp_path)
    run_id = json.loads((cfg.run_dir / "trackers.json").read_text())["mlflow"]
    assert client.get_run(run_id).info.status == "FAILED"
