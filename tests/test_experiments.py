"""Sweeps, collection, comparison and reports (issue 6), mostly on fabricated run directories."""
import csv
import io
import json
import math
import re
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from conftest import QUICK, ROOT, run_cli
from vitlab.config import Config
from vitlab.experiments import find_runs
from vitlab.experiments import sweep as sw
from vitlab.experiments.collect import table, to_csv, varying_keys
from vitlab.experiments.compare import comparison_table
from vitlab.experiments.report import build_report


def fake_run(path: Path, model="vit_micro_patch7_28", arch="vit", params=100_000, acc=0.9, epochs=3,
             batches=10, finished=True, val_batches=True, **config):
    """A run directory as the trainer writes it: config.yaml, metrics.jsonl, results.json (when finished)."""
    cfg = Config().to_dict()
    cfg["model"]["name"] = model
    for key, value in config.items():
        section, name = key.split("__")
        cfg[section][name] = value
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    lines, step = [], 0
    for e in range(1, epochs + 1):
        for b in range(1, batches + 1):
            step += 1
            loss = 2.3 * math.exp(-step / (20 * params / 1e5))
            lines.append({"kind": "train_batch", "epoch": e, "batch": b, "step": step, "loss": loss, "acc": 0.5,
                          "lr": 1e-3})
            if val_batches and b % 5 == 0:
                lines.append({"kind": "val_batch", "epoch": e, "batch": b, "step": step, "loss": loss * 1.1})
        lines.append({"kind": "epoch", "epoch": e, "step": step, "val_loss": 1.0 / e, "val_top1": acc * e / epochs,
                      "val_top5": 0.99, "epoch_seconds": 1.0, "images_per_second": 1000.0})
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if finished:
        (path / "results.json").write_text(json.dumps({
            "test_top1": acc, "test_top5": 0.995, "test_loss": 0.3, "params": params, "epochs": epochs,
            "gflops": 0.01, "images_per_second": 1234.5, "peak_memory_mb": 321.0, "train_memory_mb": 42.0,
            "model": model, "architecture": arch, "dataset": "mnist", "train_seconds": 9.0, "peak_memory_kind": "process_max_rss"}))
    return path


@pytest.fixture
def family(tmp_path):
    """Seed 002 in miniature: two architectures at three sizes (error falls as a power law of size)."""
    root = tmp_path / "runs"
    for arch, model, c in (("vit", "vit_micro_patch7_28", 2.0), ("diff_vit", "diff_vit_micro_patch7_28", 1.5)):
        for dim, params in ((32, 100_000), (48, 200_000), (64, 400_000)):
            fake_run(root / f"{arch}_{dim}", model=model, arch=arch, params=params,
                     acc=1 - c * params ** -0.3, model__embed_dim=dim)
    return root


# -- sweep ---------------------------------------------------------------------------------------------------
def write_spec(tmp_path, body: str) -> Path:
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"base: {ROOT / 'configs' / 'quickstart.yaml'}\n" + body)
    return spec


def test_sweep_expands_grid_times_zip_with_stable_readable_names(tmp_path):
    spec = write_spec(tmp_path, "set: {train.epochs: 1}\n"
                                "grid: {optim.lr: [0.001, 0.003], model.depth: [2, 4]}\n"
                                "zip: {model.name: [vit_micro_patch2_8, diff_vit_micro_patch2_8], "
                                "model.drop_rate: [0.0, 0.1]}\n")
    sweep = sw.load_spec(spec)
    names = [p.name for p in sweep.points]
    assert len(names) == 8 and len(set(names)) == 8
    assert names[0] == "name-vit_micro_patch2_8_drop_rate-0.0_lr-0.001_depth-2"
    assert names[-1] == "name-diff_vit_micro_patch2_8_drop_rate-0.1_lr-0.003_depth-4"
    assert sw.load_spec(spec).points == sweep.points  # deterministic
    args = sweep.train_args(sweep.points[0], tmp_path / "out")
    assert args[:3] == ["--config", str(ROOT / "configs" / "quickstart.yaml"), "--reload"]
    assert "train.epochs=1" in args and "optim.lr=0.001" in args and "output.savefile=" + names[0] in args
    assert f"output.dir={tmp_path}" in args and "task_name=out" in args


def test_zip_rows_can_be_named(tmp_path):
    spec = write_spec(tmp_path, "grid: {model.depth: [2, 4]}\n"
                                "zip: {name: [small, drop], model.drop_rate: [0.0, 0.1], optim.lr: [0.001, 0.003]}\n")
    sweep = sw.load_spec(spec)
    assert [p.name for p in sweep.points] == ["small_depth-2", "small_depth-4", "drop_depth-2", "drop_depth-4"]
    assert sweep.points[2].overrides == {"model.drop_rate": 0.1, "optim.lr": 0.003, "model.depth": 2}
    only = sw.load_spec(write_spec(tmp_path, "zip: {name: [a, b], optim.lr: [0.001, 0.003]}\n"))
    assert [p.name for p in only.points] == ["a", "b"]


@pytest.mark.parametrize("body,message", [
    ("grid: {optim.lrr: [1]}\n", "unknown config key 'optim.lrr'"),
    ("grid: {optim.lr: 3}\n", "must list one or more values"),
    ("zip: {optim.lr: [1, 2], model.depth: [1]}\n", "must have one length"),
    ("grids: {}\n", "unknown key(s) grids"),
    ("grid: {model.depth: [2, 2]}\n", "both named 'depth-2'"),
])
def test_bad_specs_are_one_line_errors(tmp_path, capsys, body, message):
    code, _, err = run_cli(["sweep", write_spec(tmp_path, body), "--output", tmp_path / "o"], capsys)
    assert code == 2 and message in err and err.count("\n") == 1


def test_second_call_skips_finished_and_resumes_unfinished(tmp_path, monkeypatch, capsys):
    spec = write_spec(tmp_path, "grid: {model.depth: [2, 3, 4]}\n")
    root = tmp_path / "sw"
    fake_run(root / "depth-2")  # finished
    (root / "depth-3" / "checkpoints" / "last").mkdir(parents=True)  # interrupted after an epoch
    calls = []

    def trains(cmd):  # a training that finishes: its run holds results.json
        calls.append(cmd)
        fake_run(root / next(a for a in cmd if a.startswith("output.savefile=")).split("=", 1)[1])
        return 0, None
    monkeypatch.setattr(sw, "_train", trains)
    code, out, _ = run_cli(["sweep", spec, "--output", root], capsys)
    assert code == 0
    assert "[1/3] depth-2: finished, skipped" in out and "[2/3] depth-3: resuming" in out
    assert "[3/3] depth-4: training" in out
    assert [c[c.index("--reload") - 2:c.index("--reload")] for c in calls] == [["--config", str(
        ROOT / "configs" / "quickstart.yaml")]] * 2
    assert [next(a for a in c if a.startswith("output.savefile=")) for c in calls] == [
        "output.savefile=depth-3", "output.savefile=depth-4"]
    monkeypatch.setattr(sw, "_train", lambda cmd: (1, None))
    (root / "depth-4" / "results.json").unlink()
    code, _, err = run_cli(["sweep", spec, "--output", root], capsys)
    assert code == 2 and "run 'depth-4' failed (exit 1)" in err


@pytest.mark.parametrize("code, received, exit_code, needle", [
    (0, None, 75, "was stopped by a signal before it finished"),  # SIGTERM to the training: saved, exit 0
    (75, None, 75, "was stopped by a signal before it finished"),  # SIGUSR1: saved, requeued, exit 75
    (130, None, 130, "was stopped by a signal before it finished"),
    (-9, None, 137, "was killed by SIGKILL before it finished"),
    (0, 15, 75, "sweep sw stopped by SIGTERM at run 'depth-2' (1 of 2)"),  # the sweep's own, passed on
    (0, 2, 130, "sweep sw stopped by SIGINT at run 'depth-2' (1 of 2)"),
])
def test_a_stopped_or_killed_training_is_never_taken_as_done(tmp_path, monkeypatch, capsys, code, received,
                                                             exit_code, needle):
    """A point is done only when its run wrote results.json; a stop ends the sweep in one line with a code a
    wrapper reads as 'not finished' (the next point does not start), and the next call resumes the point."""
    spec = write_spec(tmp_path, "name: sw\ngrid: {model.depth: [2, 3]}\n")
    root = tmp_path / "sw"
    calls = []
    monkeypatch.setattr(sw, "_train", lambda cmd: calls.append(cmd) or (code, received))
    got, out, err = run_cli(["sweep", spec, "--output", root], capsys)
    assert got == exit_code and len(calls) == 1, err
    assert err.strip().splitlines() == [f"vitlab: {err.strip().removeprefix('vitlab: ')}"] and needle in err
    assert "call the sweep again: finished runs are skipped, this one resumes from its last checkpoint" in err
    assert "trained or resumed now" not in out


def test_sigterm_to_a_sweeps_training_stops_the_sweep_and_the_point_resumes(tmp_path, capsys):
    """Real processes: the training of the first point gets SIGTERM (saves, exits 0 without results.json); the
    sweep does not start the next point, exits 75 with one line, and a dry run shows the point to resume."""
    import os
    import signal
    import sys
    import time
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"base: {ROOT / 'configs' / 'quickstart.yaml'}\nname: sw\n"
                    f"set: {{{', '.join(q.replace('=', ': ') for q in QUICK if 'depth' not in q)}, train.epochs: 200, "
                    "train.log_every: 2}\ngrid: {model.depth: [1, 2]}\n")
    root = tmp_path / "sw"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen([sys.executable, "-m", "vitlab", "sweep", str(spec), "--output", str(root)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = root / "depth-1" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (metrics.exists() and metrics.stat().st_size > 2000) and time.time() < deadline:
        assert sweep.poll() is None, sweep.communicate()
        time.sleep(0.05)
    children = Path(f"/proc/{sweep.pid}/task/{sweep.pid}/children").read_text().split()
    assert len(children) == 1
    os.kill(int(children[0]), signal.SIGTERM)  # the training, not the sweep
    out, err = sweep.communicate(timeout=120)
    assert sweep.returncode == 75, err
    assert err.strip().splitlines()[-1] == (
        "vitlab: sweep sw stopped: run 'depth-1' (1 of 2) was stopped by a signal before it finished; call the "
        "sweep again: finished runs are skipped, this one resumes from its last checkpoint")
    # the training's own line above it: 'at epoch 1, batch 5, step 21' or, when the signal lands between epochs,
    # 'at the end of epoch 1, step 21'
    assert re.search(r"stopped by SIGTERM at (the end of )?epoch \d+", err) and "Traceback" not in err
    assert "[2/2]" not in out and not (root / "depth-2").exists()
    assert (root / "depth-1" / "checkpoints" / "last").is_dir() and not (root / "depth-1" / "results.json").exists()
    code, out, _ = run_cli(["sweep", spec, "--output", root, "--dry-run"], capsys)
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == ["resume", "new"]


def test_sweep_over_a_model_argument_trains_for_real_then_skips(tmp_path, capsys):
    """Two real 1-epoch runs of the momentum ViT through `vitlab train` subprocesses, swept over its own
    constructor argument `beta`; collect shows it as a column; the second call trains nothing."""
    quick = [q for q in QUICK if not q.startswith("model.name=")] + ["model.name=momentum_vit_micro_patch2_8"]
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"base: {ROOT / 'configs' / 'quickstart.yaml'}\n"
                    f"set: {{{', '.join(q.replace('=', ': ') for q in quick)}, train.epochs: 1, "
                    "data.max_train_samples: 256}\n"
                    "grid: {model.beta: [0.5, 0.9]}\n")
    root = tmp_path / "sw"
    code, out, _ = run_cli(["sweep", spec, "--output", root], capsys)
    assert code == 0, out
    runs = find_runs([root])
    assert [r.path.name for r in runs] == ["beta-0.5", "beta-0.9"] and all(r.finished for r in runs)
    assert runs[0].flat_config["model.beta"] == 0.5 and runs[0].results["epochs"] == 1
    assert runs[1].results["model_args"]["beta"] == 0.9
    code, out, _ = run_cli(["collect", root], capsys)
    header = out.splitlines()[0]
    assert code == 0 and "| model.beta |" in header
    assert "| 0.5 |" in out and "| 0.9 |" in out
    code, out, _ = run_cli(["sweep", spec, "--output", root], capsys)
    assert out.count("finished, skipped") == 2 and "0 trained or resumed now" in out


def test_torchrun_and_slurm_scripts_list_only_unfinished_runs(tmp_path, capsys, monkeypatch):
    spec = write_spec(tmp_path, "grid: {model.depth: [2, 3]}\n")
    root = tmp_path / "sw"
    fake_run(root / "depth-2")
    code, out, _ = run_cli(["sweep", spec, "--output", root, "--launcher", "torchrun"], capsys)
    script = (root / "sweep_torchrun.sh").read_text()
    assert code == 0 and script.count("torchrun --standalone") == 1 and "output.savefile=depth-3" in script
    subprocess.run(["bash", "-n", root / "sweep_torchrun.sh"], check=True)  # valid bash
    code, out, _ = run_cli(["sweep", spec, "--output", root, "--launcher", "slurm"], capsys)
    sbatch = (root / "sweep.sbatch").read_text()
    assert "#SBATCH --array=0-0" in sbatch and "output.savefile=depth-3" in sbatch and "depth-2" not in sbatch
    subprocess.run(["bash", "-n", root / "sweep.sbatch"], check=True)
    # --submit calls sbatch with the script; the array task expands its line back into the same arguments
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "sbatch").write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/submitted\n")
    (fake_bin / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:/usr/bin:/bin")
    code, _, _ = run_cli(["sweep", spec, "--output", root, "--launcher", "slurm", "--submit"], capsys)
    assert code == 0 and (tmp_path / "submitted").read_text().strip() == str(root / "sweep.sbatch")
    expanded = subprocess.run(["bash", "-c", sbatch.split("RUNS=(")[1].split("\n)")[0].join(
        ["RUNS=(", "\n)\n"]) + 'eval "set -- ${RUNS[0]}"; printf "%s\\n" "$@"'], capture_output=True, text=True)
    sweep = sw.load_spec(spec)
    assert expanded.stdout.splitlines() == sweep.train_args(sweep.points[1], root)
    fake_run(root / "depth-3")
    for launcher in ("torchrun", "slurm"):
        code, _, err = run_cli(["sweep", spec, "--output", root, "--launcher", launcher], capsys)
        assert code == 2 and "is finished; nothing to launch" in err


# -- collect -------------------------------------------------------------------------------------------------
def test_collect_shows_varying_config_and_results(family, tmp_path, capsys):
    fake_run(family / "partial", finished=False, epochs=1, model__embed_dim=80)
    runs = find_runs([family])
    assert varying_keys(runs) == ["model.name", "model.embed_dim"]
    header, rows = table(runs)
    assert header[:4] == ["run", "model.name", "model.embed_dim", "status"]
    by_run = {r[0]: dict(zip(header, r)) for r in rows}
    assert by_run["vit_64"]["top-1 %"] == f"{100 * (1 - 2.0 * 400_000 ** -0.3):.2f}"
    assert by_run["vit_64"]["params (M)"] == "0.40" and by_run["vit_64"]["img/s"] == "1,234"
    assert by_run["partial"]["status"] == "unfinished (1 epochs)" and by_run["partial"]["top-1 %"] == ""
    rows_csv = list(csv.DictReader(io.StringIO(to_csv(runs))))
    assert len(rows_csv) == 7 and rows_csv[0]["params"] == "100000"
    code, out, _ = run_cli(["collect", family, "--csv", tmp_path / "t.csv"], capsys)
    assert code == 0 and out.splitlines()[0].startswith("| run | model.name | model.embed_dim | status |")
    assert (tmp_path / "t.csv").read_text() == to_csv(runs)


def test_a_key_older_runs_lack_counts_as_its_default(family):
    """Runs written before a config key existed used its default: that key does not vary between them and
    a newer run that left it at the default."""
    newer = family / "vit_32"
    cfg = yaml.safe_load((newer / "config.yaml").read_text())
    for name in ("vit_48", "vit_64"):  # written by an older vitlab: no data.canvas_size key
        old = yaml.safe_load((family / name / "config.yaml").read_text())
        del old["data"]["canvas_size"]
        (family / name / "config.yaml").write_text(yaml.safe_dump(old))
    assert cfg["data"]["canvas_size"] == Config().data.canvas_size
    assert "data.canvas_size" not in varying_keys(find_runs([family]))


def test_collect_errors(tmp_path, capsys):
    code, _, err = run_cli(["collect", tmp_path / "absent"], capsys)
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(["collect", tmp_path], capsys)
    assert code == 2 and "no run directories" in err


def test_comparison_table_has_seed003_columns(family):
    header, rows = comparison_table(find_runs([family]))
    assert header == ["model", "top-1 %", "epochs", "params (M)", "peak mem (MiB)", "train mem (MiB)", "img/s"]
    assert rows[0] == ["diff_vit_micro_patch7_28", f"{100 * (1 - 1.5 * 100_000 ** -0.3):.2f}", "3", "0.10", "321",
                       "42", "1,234"]


def test_compare_rejects_mixed_datasets(tmp_path, capsys):
    code, _, err = run_cli(["compare", ROOT / "configs" / "quickstart.yaml", ROOT / "configs" / "mnist.yaml",
                            "--output", tmp_path], capsys)
    assert code == 2 and "same data" in err and "quickstart.yaml: digits" in err


# -- report --------------------------------------------------------------------------------------------------
class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.cells, self.stack = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag not in ("meta", "img", "br", "hr", "link"):  # void elements have no end tag
            self.stack.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}>"
        self.stack.pop()

    def handle_data(self, data):
        if self.stack and self.stack[-1] in ("td", "th"):
            self.cells.append(data)


def test_report_is_self_contained_html_with_table_and_plots(family, tmp_path, capsys):
    out = tmp_path / "r" / "report.html"
    code, _, _ = run_cli(["report", family, "--out", out], capsys)
    assert code == 0
    page = _Page()
    page.feed(out.read_text())
    page.close()
    assert not page.stack  # every tag closed
    assert len(page.images) >= 8 and all(src.startswith("data:image/png;base64,") for src in page.images)
    assert "vit_64" in page.cells and "model.embed_dim" in page.cells and "0.40" in page.cells
    assert "http" not in out.read_text().replace("http-equiv", "")  # nothing fetched from elsewhere


def test_build_report_escapes_text(family):
    runs = find_runs([family])
    page = build_report(runs, {}, title="<script>x</script>")
    assert "<script>x" not in page and "&lt;script&gt;" in page
