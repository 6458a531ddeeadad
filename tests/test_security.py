"""Security (issue 29): what vitlab does with what it does not trust.

Sections: names and markup (here); secrets and run-directory files: tests/test_run_files.py. The threat model
is in docs/design.md (## Threat model).
"""
import csv
import errno
import io
import json
import os
import shlex
import subprocess
from pathlib import Path

import matplotlib
import pytest
import yaml

from conftest import QUICK, ROOT, run_cli
from test_experiments import fake_run
from vitlab.config import load_config
from vitlab.errors import VitlabError
from vitlab.experiments import find_runs
from vitlab.experiments import sweep as sw
from vitlab.names import atomic_write, csv_cell, path_inside, printable, safe_name

# == names and markup ========================================================================================

#: names that must never become a path component or a word of a script
HOSTILE_NAMES = {
    "parent": "../../x", "absolute": "/abs/dir", "dot-dot": "..", "dot": ".", "hidden": ".hidden",
    "dash": "-rf", "newline": "a\nb", "carriage return": "a\rb", "tab": "a\tb", "NUL": "a\x00b",
    "escape sequence": "a\x1b[2Jb", "line separator": "a\u2028b", "bidi override": "a\u202eb",
    "command substitution": "$(touch PWNED)", "backticks": "`touch PWNED`", "semicolon": "a;touch PWNED",
    "pipe": "a|b", "ampersand": "a&b", "redirect": "a>b", "glob": "a*", "quote": "a'b", "double quote": 'a"b',
    "space": "a b", "backslash": "a\\b", "windows drive": "C:\\x", "non-ascii": "résumé", "empty": "",
    "blank": "   ", "too long": "x" * 256, "variable": "${HOME}", "tilde": "~root",
}


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*")}


@pytest.mark.parametrize("label", sorted(HOSTILE_NAMES))
def test_safe_name_refuses_hostile_names_in_one_line(label):
    with pytest.raises(VitlabError) as info:
        safe_name(HOSTILE_NAMES[label], "output.savefile (--savefile)")
    message = str(info.value)
    assert "output.savefile" in message and "\n" not in message and printable(message) == message


@pytest.mark.parametrize("name", ["run_01", "depth-3_lr-0.001", "a+b", "7", "x" * 255, "_private", "v1.2"])
def test_safe_name_keeps_plain_names(name):
    assert safe_name(name, "x") == name and shlex.quote(name) == name  # nothing for a shell to read


@pytest.mark.parametrize("key,label", [(k, lab) for k in ("task_name", "output.savefile", "--savefile")
                                       for lab in ("parent", "absolute", "newline", "command substitution", "NUL")])
def test_train_refuses_hostile_task_and_run_names_before_writing(tmp_path, capsys, key, label):
    """task_name=../../x or /abs/dir never writes outside --output (nor over an existing run's files): one
    line, exit 2, nothing written anywhere."""
    name = HOSTILE_NAMES[label] if label != "absolute" else str(tmp_path / "abs")
    out = tmp_path / "deep" / "out"
    out.mkdir(parents=True)
    before = files_under(tmp_path)
    pair = ["--savefile", name] if key == "--savefile" else [f"{key}={name}"]
    code, _, err = run_cli(["train", "--output", out, *QUICK, "train.epochs=1", *pair], capsys)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert ("task_name" if key == "task_name" else "savefile") in err
    assert files_under(tmp_path) == before and not (tmp_path / "x").exists() and not Path("PWNED").exists()


def test_task_name_from_a_config_file_is_checked_too(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"task_name": "../../escaped", "data": {"dataset": "digits"}}))
    code, _, err = run_cli(["train", "--config", config, "--output", tmp_path / "out"], capsys)
    assert code == 2 and "task_name" in err and not (tmp_path.parent / "escaped").exists()


def test_run_dir_stays_inside_output_even_when_the_config_is_changed_after_checking(tmp_path):
    cfg = load_config(None, [f"output.dir={tmp_path}"])
    assert cfg.run_dir == tmp_path / "vitlab" / "run_01"
    cfg.task_name = "../.."
    with pytest.raises(VitlabError, match="task_name"):
        cfg.run_dir  # noqa: B018 -- the property is the check
    assert path_inside(tmp_path, "a", "b") == tmp_path / "a" / "b"
    with pytest.raises(VitlabError):
        path_inside(tmp_path, "a", "/etc")


def write_spec(tmp_path: Path, body: str, name: str = "spec.yaml") -> Path:
    spec = tmp_path / name
    spec.write_text(f"base: {ROOT / 'configs' / 'quickstart.yaml'}\n" + body)
    return spec


@pytest.mark.parametrize("label", ["parent", "absolute", "newline", "command substitution", "semicolon", "space"])
def test_sweep_spec_name_cannot_move_or_inject(tmp_path, capsys, monkeypatch, label):
    """A spec's `name: ../../..` does not move the sweep outside output/sweeps, and a name with a newline is
    refused before any script is written."""
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path, f"name: {json.dumps(HOSTILE_NAMES[label])}\ngrid: {{model.depth: [2, 3]}}\n")
    before = files_under(tmp_path)
    for launcher in ("torchrun", "slurm"):
        code, _, err = run_cli(["sweep", spec, "--launcher", launcher, "--submit"], capsys)
        assert code == 2 and err.count("\n") == 1 and "`name`" in err
    assert files_under(tmp_path) == before and not Path("PWNED").exists()


def test_spec_file_name_is_the_sweep_name_and_is_checked(tmp_path):
    spec = write_spec(tmp_path, "grid: {model.depth: [2]}\n", name="x;touch PWNED.yaml")
    with pytest.raises(VitlabError, match="file name"):
        sw.load_spec(spec)


@pytest.mark.parametrize("label", ["parent", "absolute", "newline", "backticks", "hidden", "empty"])
def test_zip_row_name_fails_at_validation_not_at_train_time(tmp_path, label):
    spec = write_spec(tmp_path, f"zip: {{name: [ok, {json.dumps(HOSTILE_NAMES[label])}], "
                                "optim.lr: [0.001, 0.003]}\n")
    with pytest.raises(VitlabError, match="zip row name"):
        sw.load_spec(spec)


def test_sweep_output_folder_is_checked_before_writing(tmp_path, capsys):
    spec = write_spec(tmp_path, "grid: {model.depth: [2]}\n")
    for root, what in ((tmp_path / "a\nb" / "sw", "control characters"), (tmp_path / "s w", "task_name")):
        code, _, err = run_cli(["sweep", spec, "--output", root, "--launcher", "slurm"], capsys)
        assert code == 2 and what in err and err.count("\n") == 1 and not root.exists()
    sweep = sw.load_spec(spec)  # `--output .` names the folder itself (its absolute path's last part)
    args = sweep.train_args(sweep.points[0], Path("."))
    assert f"task_name={Path.cwd().name}" in args


def fake_tools(tmp_path: Path) -> Path:
    """torchrun, sbatch, srun and python3 that record their arguments: NUL after each, \\x01 after each call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "calls").mkdir()
    for tool in ("torchrun", "sbatch", "srun", "python3"):
        (bin_dir / tool).write_text(f'#!/bin/bash\nprintf "%s\\0" "$@" >> "{tmp_path}/calls/{tool}"\n'
                                    f'printf "\\1" >> "{tmp_path}/calls/{tool}"\n')
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def calls(tmp_path: Path, tool: str) -> list[list[str]]:
    log = tmp_path / "calls" / tool
    return [c.split("\0")[:-1] for c in log.read_text().split("\1")[:-1]] if log.exists() else []


#: values a spec may legitimately carry (paths with spaces and quotes) that must stay one argument each
HOSTILE_VALUES = ["$(touch PWNED)", "`touch PWNED`", "a'b\"c", "x; touch PWNED", "*", "${HOME}", "a b  c"]


def test_generated_scripts_run_every_value_as_one_argument_and_nothing_else(tmp_path):
    """The scripts run with bash (torchrun, sbatch, srun stubbed): each run gets exactly its arguments, no
    injected command runs, and the #SBATCH header keeps every line."""
    parent = tmp_path / "we ird $(touch PWNED) `touch PWNED` ; 'q' \"dq\""
    root = parent / "sw"
    values = json.dumps(HOSTILE_VALUES)
    spec = write_spec(tmp_path, f"name: hostile_values\nset: {{train.epochs: 1}}\n"
                                f"zip: {{name: [{', '.join(f'v{i}' for i in range(len(HOSTILE_VALUES)))}], "
                                f"data.data_dir: {values}}}\n")
    sweep = sw.load_spec(spec)
    bin_dir = fake_tools(tmp_path)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "NPROC": "1", "HOME": str(tmp_path)}
    torchrun = sw.write_torchrun(sweep, root)
    subprocess.run(["bash", torchrun], check=True, env=env, cwd=tmp_path)
    expected = [sweep.train_args(p, root) for p in sweep.points]
    assert [c[2:] for c in calls(tmp_path, "torchrun")] == [["-m", "vitlab", "train", *a] for a in expected]
    slurm = sw.write_slurm(sweep, root)
    header = [line for line in slurm.read_text().splitlines() if line.startswith("#SBATCH")]
    assert header[0] == "#SBATCH --job-name=hostile_values" and len(header) == 8
    assert {"--array", "--time", "--gpus-per-task"} <= {line.split()[1].split("=")[0] for line in header}
    for task in range(len(sweep.points)):
        subprocess.run(["bash", slurm], check=True, env={**env, "SLURM_ARRAY_TASK_ID": str(task),
                                                         "SLURM_SUBMIT_DIR": str(tmp_path)}, cwd=tmp_path)
    srun = calls(tmp_path, "srun")
    assert [c[5:] for c in srun] == expected and all(c[1:5] == ["python3", "-m", "vitlab", "train"] for c in srun)
    assert not list(tmp_path.rglob("PWNED")) and not Path("PWNED").exists() and not calls(tmp_path, "python3")
    assert {v for a in expected for v in a if v.startswith("data.data_dir=")} == {
        f"data.data_dir={sw._yaml_scalar(v)}" for v in HOSTILE_VALUES}


def test_script_lines_with_control_characters_are_refused_before_writing(tmp_path):
    spec = write_spec(tmp_path, "grid: {model.depth: [2]}\n")
    sweep = sw.load_spec(spec)
    sweep.name = "a\nsrun touch PWNED"  # past the spec check (e.g. a library caller): the writer refuses it
    for write in (sw.write_torchrun, sw.write_slurm):
        with pytest.raises(VitlabError, match="control characters"):
            write(sweep, tmp_path / "sw")
    assert not (tmp_path / "sw").exists()


def test_compare_config_file_names_are_checked(tmp_path):
    from vitlab.experiments.compare import comparison

    config = tmp_path / "a;touch PWNED.yaml"
    config.write_text((ROOT / "configs" / "quickstart.yaml").read_text())
    with pytest.raises(VitlabError, match="file name"):
        comparison([str(config)], 1)


# -- sinks: HTML, CSV, figures, logs --------------------------------------------------------------------------
EVIL_MODEL = "<script>alert(1)</script>"
FORMULAS = ["=HYPERLINK(\"http://x\")", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx", "=cmd|' /C calc'!A0"]


@pytest.fixture
def evil_runs(tmp_path):
    """Run directories whose names and recorded names are hostile (a copied run folder is not trusted)."""
    root = tmp_path / "runs"
    fake_run(root / "=cmd|' calc'!A0", model=EVIL_MODEL, arch="x' onerror='alert(1)", params=100_000)
    fake_run(root / "evil\nrow\x1b[2J", model="$\\frac{1}{0$", arch="$x^2$", params=200_000, acc=0.95)
    fake_run(root / "plain", model="_hidden", arch="$x^2$", params=400_000, acc=0.97)
    for i, formula in enumerate(FORMULAS):
        fake_run(root / f"f{i}", model=formula, arch="vit", params=100_000 * (i + 1), data__data_dir=formula)
    return root


def test_html_report_escapes_names_and_title(evil_runs, tmp_path, capsys):
    out = tmp_path / "report.html"
    code, _, err = run_cli(["report", evil_runs, "--out", out, "--title", "<img src=x onerror=alert(1)>"], capsys)
    page = out.read_text()
    assert code == 0, err
    assert "<script" not in page and "<img src=x" not in page and "onerror='" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "x&#x27; onerror=&#x27;alert(1)" in page  # the figure's alt text, from the architecture


def test_collect_csv_cells_are_never_formulas(evil_runs, tmp_path, capsys):
    out = tmp_path / "runs.csv"
    code, stdout, err = run_cli(["collect", evil_runs, "--csv", out], capsys)
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(out.read_bytes().decode())))  # CR inside a cell kept as written
    cells = [c for row in rows for c in row]
    assert all(not c.startswith(("=", "+", "-", "@", "\t", "\r")) for c in cells)
    assert "'=cmd|' calc'!A0" in cells and all(f"'{f}".replace("\r", "\n") in cells for f in FORMULAS)
    assert len(rows) == 1 + 3 + len(FORMULAS) and len({len(row) for row in rows}) == 1  # no cell ends a row
    assert csv_cell(-0.5) == -0.5 and csv_cell("0.5") == "0.5"  # numbers stay numbers
    table = stdout.split("\n\n")[0].splitlines()  # one line per run: header, rule, 10 rows
    assert len(table) == 2 + 3 + len(FORMULAS) and "evil\\nrow\\x1b[2J" in stdout and "\x1b" not in stdout


def test_figures_show_names_literally_without_mathtext(evil_runs, tmp_path):
    from matplotlib.text import Text

    from vitlab.plots import all_run_figures, save

    figures = all_run_figures(find_runs([evil_runs]))
    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text as text, to read it back
        written = save(figures, tmp_path / "figs", formats=("svg",))  # a mathtext parse error would raise here
    svg = "".join(p.read_text() for p in written)
    assert "$\\frac{1}{0$" in svg and "$x^2$" in svg and "_hidden" in svg
    for fig in figures.values():
        for text in fig.findobj(Text):  # a name's every `$` escaped: not parsed as mathtext (log ticks are)
            if not text.get_text().startswith("$\\mathdefault"):
                assert text.get_text().count("$") == text.get_text().count("\\$")


def test_log_and_error_lines_show_control_characters_escaped(tmp_path, capsys):
    from vitlab.train.metrics import RunLogger

    log = RunLogger(tmp_path, progress="plain", stream=io.StringIO())
    log.info("data hf:evil\nFAKE 2024-01-01 test top-1 1.0000\x1b[2J")
    log.write("stopped\r\x00")
    log.close()
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert len(lines) == 2 and "evil\\nFAKE" in lines[0] and "\\x1b[2J" in lines[0] and "\\r\\x00" in lines[1]
    code, _, err = run_cli(["train", *QUICK, "output.savefile=a\nvitlab: done\x1b[2J"], capsys)
    assert code == 2 and err.count("\n") == 1 and "\x1b" not in err


# -- atomic writes ------------------------------------------------------------------------------------------
def no_space(*_):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("command", ["report", "collect", "plot", "torchrun", "slurm"])
def test_outputs_are_replaced_whole_or_not_at_all(tmp_path, capsys, monkeypatch, command):
    """A full disk while `vitlab report` (or collect, plot, a sweep script) rewrites its file leaves the old
    file whole and no temporary file behind; the error is one line."""
    runs = tmp_path / "runs"
    fake_run(runs / "a", epochs=1)
    spec = write_spec(tmp_path, "grid: {model.depth: [2]}\n")
    target = {"report": tmp_path / "report.html", "collect": tmp_path / "runs.csv",
              "plot": tmp_path / "figs" / "parameters.png", "torchrun": tmp_path / "sw" / "sweep_torchrun.sh",
              "slurm": tmp_path / "sw" / "sweep.sbatch"}[command]
    argv = {"report": ["report", runs, "--out", target], "collect": ["collect", runs, "--csv", target],
            "plot": ["plot", runs, "--out", target.parent],
            "torchrun": ["sweep", spec, "--output", target.parent, "--launcher", "torchrun"],
            "slurm": ["sweep", spec, "--output", target.parent, "--launcher", "slurm"]}[command]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("the old file\n")
    monkeypatch.setattr("vitlab.names.os.fsync", no_space)
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "no space left" in err and err.count("\n") == 1
    assert target.read_text() == "the old file\n"
    assert not [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.undo()
    code, _, err = run_cli(argv, capsys)
    assert code == 0 and target.read_bytes() != b"the old file\n", err


def test_atomic_write_keeps_mode_and_refuses_a_folder(tmp_path):
    script = atomic_write(tmp_path / "s.sh", "#!/bin/sh\n", mode=0o755)
    assert os.access(script, os.X_OK) and script.read_text() == "#!/bin/sh\n"
    with pytest.raises(IsADirectoryError):
        atomic_write(tmp_path, "x")
