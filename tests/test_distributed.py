"""Data parallelism with real processes on CPU (gloo): detection, exact equivalence, rank-0 writes, failures."""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import vitlab
from conftest import QUICK, ROOT
from vitlab.config import DataConfig
from vitlab.data import build_data
from vitlab.errors import VitlabError
from vitlab.train.distributed import DistEnv, detect, expand_nodelist, slurm_port

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
               "ROLE_RANK", "TORCHELASTIC_RUN_ID")


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    env.update(PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", **{k: str(v) for k, v in extra.items()})
    return env


def free_port(lo: int = 15000, hi: int = 35000) -> int:
    """A free TCP port in [lo, hi) (SLURM ports are derived from the job id in 15000-34999)."""
    for port in torch.randperm(hi - lo).add(lo).tolist():
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


# -- detection (no processes) -------------------------------------------------------------------------------
def test_detect_torchrun_slurm_and_local():
    tr = detect(environ={"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
                         "MASTER_ADDR": "n1", "MASTER_PORT": "1234"})
    assert tr == DistEnv(3, 8, 1, 4, "torchrun", "n1", 1234)
    sl = detect(environ={"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                         "SLURM_NTASKS_PER_NODE": "4", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"})
    assert sl == DistEnv(5, 8, 1, 4, "slurm", "gpu07", slurm_port("4242"))
    both = detect(environ={"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "29500",
                           "SLURM_PROCID": "7", "SLURM_NTASKS": "16"})
    assert both.launcher == "torchrun" and both.world_size == 2  # `srun torchrun`: torchrun's ranks win
    assert detect(environ={}) == DistEnv()
    local = detect(local=True, environ={"SLURM_PROCID": "2", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "a1"})
    assert (local.launcher, local.world_size, local.rank) == ("none", 1, 2)
    with pytest.raises(VitlabError, match="WORLD_SIZE"):
        detect(environ={"RANK": "0", "WORLD_SIZE": "two"})


TORCHRUN = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500"}
SRUN = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_JOB_NODELIST": "localhost", "SLURM_JOB_ID": "4242"}
#: partial or impossible launch environments (issue 29): (label, variables, what the one line names)
PARTIAL_LAUNCHES = [
    ("rank and world size alone", {"RANK": "0", "WORLD_SIZE": "2"}, "MASTER_ADDR and MASTER_PORT are not"),
    ("world size 1 alone", {"RANK": "0", "WORLD_SIZE": "1"}, "nowhere to meet"),
    ("no port", {**TORCHRUN, "MASTER_PORT": ""}, "MASTER_PORT is not"),
    ("rank = world size", {**TORCHRUN, "RANK": "2"}, "RANK=2 is not a rank of WORLD_SIZE=2 (0 to 1)"),
    ("negative rank", {**TORCHRUN, "RANK": "-1"}, "RANK=-1 is not a rank"),
    ("world size 0", {**TORCHRUN, "RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE=0: a job has at least one process"),
    ("negative world size", {**TORCHRUN, "RANK": "0", "WORLD_SIZE": "-2"}, "WORLD_SIZE=-2"),
    ("port not a number", {**TORCHRUN, "MASTER_PORT": "http"}, "MASTER_PORT='http' is not an integer"),
    ("port 0", {**TORCHRUN, "MASTER_PORT": "0"}, "MASTER_PORT=0 is not a TCP port (1 to 65535)"),
    ("port 70000", {**TORCHRUN, "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP port"),
    ("local rank = local world", {**TORCHRUN, "LOCAL_RANK": "2"}, "LOCAL_RANK=2 is not a local rank"),
    ("local world > world", {**TORCHRUN, "LOCAL_WORLD_SIZE": "3"}, "LOCAL_WORLD_SIZE=3 must be 1 to WORLD_SIZE=2"),
    ("huge rank", {**TORCHRUN, "RANK": "9" * 30}, "is not a rank"),
    ("srun without a node list", {k: v for k, v in SRUN.items() if k != "SLURM_JOB_NODELIST"},
     "SLURM_JOB_NODELIST is not"),
    ("srun rank = tasks", {**SRUN, "SLURM_PROCID": "2"}, "SLURM_PROCID=2 is not a rank of SLURM_NTASKS=2"),
    ("srun 0 tasks", {**SRUN, "SLURM_PROCID": "0", "SLURM_NTASKS": "0"}, "SLURM_NTASKS=0"),
    ("srun local id = tasks per node", {**SRUN, "SLURM_LOCALID": "5"}, "SLURM_LOCALID=5 is not a local rank"),
    ("srun port 0", {**SRUN, "MASTER_PORT": "0"}, "MASTER_PORT=0 is not a TCP port"),
    ("srun node list range", {**SRUN, "SLURM_JOB_NODELIST": "gpu[a-b]"}, "not N or N-M"),
    ("srun node list huge range", {**SRUN, "SLURM_JOB_NODELIST": "n[0-999999999]"}, "not N or N-M"),
    ("srun node list empty", {**SRUN, "SLURM_JOB_NODELIST": ","}, "names no host"),
]


@pytest.mark.parametrize("label, environ, needle", PARTIAL_LAUNCHES, ids=[c[0] for c in PARTIAL_LAUNCHES])
def test_a_partial_launch_environment_is_one_line(label, environ, needle, monkeypatch):
    monkeypatch.setenv("PATH", "")  # no scontrol: the node list is parsed here
    with pytest.raises(VitlabError) as e:
        detect(environ=environ)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert "torchrun" in str(e.value) or "srun" in str(e.value)


def test_what_partial_launches_border_on_is_accepted():
    assert detect(environ=TORCHRUN) == DistEnv(1, 2, 1, 2, "torchrun", "127.0.0.1", 29500)
    # --local needs only the rank: the launch's other variables may be anything
    assert detect(local=True, environ={"RANK": "0", "WORLD_SIZE": "2"}) == DistEnv()
    assert detect(local=True, environ={"SLURM_PROCID": "3", "SLURM_NTASKS": "0"}).rank == 3
    one = detect(environ={"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"})  # one task, no list
    assert (one.world_size, one.master_addr) == (1, "127.0.0.1")
    uneven = detect(environ={**SRUN, "SLURM_NTASKS": "5", "SLURM_NTASKS_PER_NODE": "2(x2),1",
                             "MASTER_ADDR": "head"})  # nodes with different task counts; an explicit address
    assert (uneven.local_world_size, uneven.master_addr) == (2, "head")
    big_job = detect(environ={**SRUN, "SLURM_NTASKS_PER_NODE": "8"})  # the job's count, larger than the step's
    assert big_job.local_world_size == 2


def test_an_unbounded_dist_timeout_is_one_line_not_an_overflow():
    from vitlab.train.distributed import process_group
    for bad in (1e308, float("nan"), 0.0, -5.0):
        with pytest.raises(VitlabError, match="train.dist_timeout"):
            with process_group(DistEnv(0, 1, launcher="slurm", master_port=free_port()), torch.device("cpu"), bad):
                pass


def test_a_partial_launch_is_refused_by_the_cli_before_anything_is_written(tmp_path):
    """In a real process: one line, exit 2, no run directory, and no wait for a peer that cannot come (before,
    `RANK=2 WORLD_SIZE=2` with an address waited for the rendezvous until killed)."""
    env = clean_env(RANK=2, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    done = subprocess.run([sys.executable, *train_args(tmp_path, "partial", 32)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "vitlab: error: [rank 2] RANK=2 is not a rank of WORLD_SIZE=2 (0 to 1); launch with torchrun, which sets "
        "them consistently, or unset them to train in one process (or pass --local)"]
    assert not any(tmp_path.iterdir())


def test_expand_nodelist_and_port():
    assert expand_nodelist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_nodelist("node7") == ["node7"]
    assert expand_nodelist("a[9-11]") == ["a9", "a10", "a11"]
    assert slurm_port("123456") == 15000 + 3456  # the job id's last four digits above 15000
    assert slurm_port("job_98765") == 15000 + 8765 and slurm_port("none") == 15000
    assert slurm_port("4241") != slurm_port("4242")  # neighbouring jobs on a node get different ports


# -- sharding (no processes) --------------------------------------------------------------------------------
@pytest.mark.parametrize("augment", ["none", "basic"])
def test_train_shards_union_is_the_global_batch(augment):
    """Ranks' k-th batches (per-device batch B) together are one process's k-th batch of 2B, augmentation
    included: the data side of '2 x B equals 1 x 2B'."""
    d = build_data(DataConfig(dataset="digits", augment=augment), img_size=8)
    one = list(d.loader("train", 32, seed=5))
    ranks = [list(d.loader("train", 16, seed=5, rank=r, world=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for k, (x, y) in enumerate(one[:-1]):
        torch.testing.assert_close(torch.cat([ranks[0][k][0], ranks[1][k][0]]), x, rtol=0, atol=0)
        assert torch.equal(torch.cat([ranks[0][k][1], ranks[1][k][1]]), y)
    assert ranks[0][-1][0].shape == ranks[1][-1][0].shape  # the short last batch is padded evenly


@pytest.mark.parametrize("dataset", ["digits", "synthetic"])  # tensor loader and DataLoader paths
def test_eval_shards_cover_every_sample_once(dataset):
    d = build_data(DataConfig(dataset=dataset, synthetic_size=70, img_size=8), img_size=8)
    n = len(d.splits["test"])
    seen = []
    for r in range(3):
        labels = torch.cat([y for _, y in d.loader("test", 16, rank=r, world=3)])
        assert len(labels) == -(-n // 3)
        seen.append(labels[labels >= 0])
    full = torch.cat([y for _, y in d.loader("test", 16)])
    assert sum(len(s) for s in seen) == n and sorted(torch.cat(seen).tolist()) == sorted(full.tolist())


# -- real processes -----------------------------------------------------------------------------------------
def start_slurm(n: int, args: list[str], job_id: int) -> list[subprocess.Popen]:
    """Start `n` plain processes given only SLURM_* variables (what `srun` sets)."""
    procs = []
    for rank in range(n):
        env = clean_env(SLURM_PROCID=rank, SLURM_NTASKS=n, SLURM_LOCALID=rank, SLURM_NTASKS_PER_NODE=n,
                        SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=job_id)
        procs.append(subprocess.Popen([sys.executable, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def launch_slurm(n: int, args: list[str], job_id: int, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """`start_slurm` and wait for every process."""
    results = []
    for p in start_slurm(n, args, job_id):
        out, err = p.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def slurm_job_id() -> int:
    return free_port() - 15000  # slurm_port(job_id) == the free port found


EQUIV = ["data.dataset=synthetic", "data.synthetic_size=256", "data.val_fraction=0.125", "data.img_size=8",
         "model.name=vit_micro_patch2_8",
         "model.depth=2", "data.augment=none", "data.num_workers=0", "output.progress=plain",
         "output.tensorboard=false", "train.epochs=2", "optim.name=sgd", "optim.lr=0.05", "optim.warmup_steps=3",
         "train.log_every=4"]


def train_args(out: Path, name: str, batch: int, *extra: str) -> list[str]:
    return ["-m", "vitlab", "train", "--output", str(out), "--savefile", name, *EQUIV,
            f"train.batch_size={batch}", *extra]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    r = subprocess.run([sys.executable, *train_args(out, "one", 32)], env=clean_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return out / "vitlab" / "one"


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / "last" / "model.safetensors"))


@pytest.mark.parametrize("strategy,batch,accum", [("ddp", 16, 1), ("fsdp", 16, 1), ("ddp", 8, 2)])
def test_two_ranks_equal_one_process_with_double_batch(single, tmp_path, strategy, batch, accum):
    """2 SLURM-launched ranks x batch 16 (or 8 x 2 accumulation steps with no_sync) == 1 process x batch 32:
    weights within 1e-5. Only rank 0 writes and tracks (one MLflow run); --reload restores the (sharded) state."""
    extra = [f"train.strategy={strategy}", f"train.accum_steps={accum}"]
    tracked = strategy == "ddp" and accum == 1 and importlib.util.find_spec("mlflow") is not None
    extra += ["output.loggers=[csv,mlflow]"] if tracked else []
    ranks = launch_slurm(2, train_args(tmp_path, "two", batch, *extra), slurm_job_id())
    assert all(r.returncode == 0 for r in ranks), ranks[0].stderr[-2000:] + ranks[1].stderr[-2000:]
    run = tmp_path / "vitlab" / "two"
    ref, got = _weights(single), _weights(run)
    assert ref.keys() == got.keys()
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=1e-5, rtol=0, msg=k)
    # Only rank 0 speaks and writes: rank 1 is silent, and the run dir holds one copy of every record.
    assert ranks[1].stdout == "" and ranks[1].stderr == ""
    assert "world size 2 (launcher slurm, backend gloo" in ranks[0].stdout
    log = (run / "train.log").read_text()
    assert log.count("test top-1") == 1 and log.count("world size 2") == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ref_records = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    batches = [r for r in records if r["kind"] == "train_batch"]
    ref_batches = [r for r in ref_records if r["kind"] == "train_batch"]
    if accum == 1:  # with accumulation a record is a micro-batch
        assert [(r["epoch"], r["batch"], r["step"]) for r in batches] == [(r["epoch"], r["batch"], r["step"])
                                                                            for r in ref_batches]
    # the logged loss is the global batch's, reduced over ranks; with accumulation the two micro-batches of a
    # step together are the reference's batch (the sampler interleaves ranks), at the same weights
    pairs = zip(batches, ref_batches) if accum == 1 else zip(zip(batches[::2], batches[1::2]), ref_batches)
    pairs = list(pairs)
    assert len(pairs) == len(ref_batches) > 0
    for a, b in pairs:
        loss, acc = (a["loss"], a["acc"]) if accum == 1 else ((a[0]["loss"] + a[1]["loss"]) / 2,
                                                             (a[0]["acc"] + a[1]["acc"]) / 2)
        assert loss == pytest.approx(b["loss"], abs=1e-5) and acc == pytest.approx(b["acc"], abs=1e-9)
    res, ref_res = json.loads((run / "results.json").read_text()), json.loads((single / "results.json").read_text())
    assert (res["world_size"], res["global_batch"], ref_res["global_batch"]) == (2, 32, 32)
    assert res["params"] == ref_res["params"]
    assert res["test_samples"] == ref_res["test_samples"] == 25
    if tracked:  # one tracked run, holding rank 0's reduced records once
        from mlflow.tracking import MlflowClient
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("vitlab").experiment_id])
        assert len(runs) == 1
        history = client.get_metric_history(runs[0].info.run_id, "train_batch/loss")
        assert sorted((m.step, m.value) for m in history) == [(r["step"], r["loss"]) for r in batches]
        assert len((run / "csv" / "train_batch.csv").read_text().splitlines()) == len(batches) + 1
    assert res["test_top1"] == ref_res["test_top1"]
    assert res["test_loss"] == pytest.approx(ref_res["test_loss"], abs=1e-5)
    assert sorted(p.name for p in run.iterdir()) == sorted([".lock", "checkpoints", "config.yaml", "metrics.jsonl",
                                                            "results.json", "train.log"]
                                                           + (["csv", "trackers.json"] if tracked else []))
    # --reload of the finished run loads the (possibly sharded) weights and optimizer back and re-tests.
    again = launch_slurm(2, train_args(tmp_path, "two", batch, *extra, "--reload"), slurm_job_id())
    assert all(r.returncode == 0 for r in again), again[0].stderr[-2000:] + again[1].stderr[-2000:]
    assert json.loads((run / "results.json").read_text())["test_loss"] == pytest.approx(res["test_loss"], abs=1e-6)


EVAL_SCRIPT = """
import json, sys, torch
from vitlab import create_model
from vitlab.config import DataConfig
from vitlab.data import build_data
from vitlab.train.distributed import detect, process_group
from vitlab.train.evaluate import evaluate

env = detect()
with process_group(env, torch.device("cpu"), 60):
    out = {}
    for dataset in ("digits", "synthetic"):
        d = build_data(DataConfig(dataset=dataset, synthetic_size=270, img_size=8), img_size=8)
        torch.manual_seed(0)
        model = create_model("vit_micro_patch2_8", in_chans=d.in_chans, num_classes=d.info.num_classes, depth=2)
        out[dataset] = evaluate(model, d.loader("test", 16, rank=env.rank, world=env.world_size), torch.device("cpu"))
    d = build_data(DataConfig(dataset="segfolder", data_dir=sys.argv[1], img_size=16, augment="none"), img_size=16)
    torch.manual_seed(0)
    model = create_model("vit_micro_patch2_8", img_size=16, patch_size=4, num_classes=d.info.num_classes, depth=2,
                         task="segment")
    out["segfolder"] = evaluate(model, d.loader("test", 2, rank=env.rank, world=env.world_size), torch.device("cpu"))
    print(json.dumps(out))
"""


def write_segfolder(root: Path, n: int = 15, size: int = 16) -> None:
    """images/i.png with masks/i.png: a bright square of class 1 or 2 on a dark background."""
    from PIL import Image
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        mask = torch.zeros(size, size, dtype=torch.uint8)
        r, c, k = (int(v) for v in torch.randint(0, size - 6, (3,), generator=g))
        mask[r:r + 6, c:c + 6] = 1 + k % 2
        image = (mask.float() * 100 + torch.rand(size, size, generator=g) * 40).to(torch.uint8)
        Image.fromarray(image.numpy()).convert("RGB").save(root / "images" / f"{i}.png")
        Image.fromarray(mask.numpy()).save(root / "masks" / f"{i}.png")


def test_two_process_evaluation_equals_one_process(tmp_path):
    """digits' test split (359) and synthetic's (27) are not multiples of 2 x 16: padding must count nowhere."""
    script = tmp_path / "eval.py"
    script.write_text(EVAL_SCRIPT)
    write_segfolder(tmp_path / "seg")
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "seg")], env=clean_env(), capture_output=True,
                         text=True, timeout=120)
    assert one.returncode == 0, one.stderr
    two = launch_slurm(2, [str(script), str(tmp_path / "seg")], slurm_job_id(), timeout=120)
    assert all(r.returncode == 0 for r in two), two[0].stderr + two[1].stderr
    ref = json.loads(one.stdout)
    for r in two:
        got = json.loads(r.stdout)
        for dataset in ref:
            assert (got[dataset]["n"], got[dataset]["top1"], got[dataset]["top5"]) == \
                   (ref[dataset]["n"], ref[dataset]["top1"], ref[dataset]["top5"])
            assert got[dataset]["loss"] == pytest.approx(ref[dataset]["loss"], rel=1e-6)
        assert (got["segfolder"]["miou"], got["segfolder"]["dice"]) == (ref["segfolder"]["miou"],
                                                                      ref["segfolder"]["dice"])
    assert ref["digits"]["n"] == 359 and ref["synthetic"]["n"] == 27
    assert ref["segfolder"]["n"] == 3 * 16 * 16  # pixels of the 3 test images (15 x 0.2)


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")
def test_torchrun_worker_killed_then_reload_completes(tmp_path):
    """SIGKILL one of two torchrun workers: the job exits non-zero within 60 s; --reload finishes the run."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    args = ["-m", "vitlab", "train", "--output", str(tmp_path), *QUICK, "train.epochs=40", "train.batch_size=32"]
    run = tmp_path / "vitlab" / "run_01"
    job = subprocess.Popen([*torchrun, *args], env=clean_env(), cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (run / "checkpoints" / "last").is_dir():
            assert job.poll() is None and time.monotonic() < deadline, job.stdout.read() if job.poll() else "slow"
            time.sleep(0.2)
        workers = _children(job.pid)
        assert len(workers) == 2
        os.kill(workers[1], signal.SIGKILL)
        t = time.monotonic()
        job.wait(timeout=60)
        assert job.returncode != 0 and time.monotonic() - t < 60
    finally:
        if job.poll() is None:
            job.kill()
        job.stdout.close()
    resumed = subprocess.run([*torchrun, *args, "--reload"], env=clean_env(), cwd=ROOT, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert "resumed from" in log and "world size 2 (launcher torchrun, backend gloo" in log
    results = json.loads((run / "results.json").read_text())
    assert results["epochs"] == 40 and results["world_size"] == 2 and results["test_top1"] > 0.8


def test_local_flag_trains_one_process_under_srun(tmp_path):
    ranks = launch_slurm(2, train_args(tmp_path, "local", 32, "train.epochs=1", "--local"), slurm_job_id())
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr
    assert ranks[1].stdout == ranks[1].stderr == ""  # rank 1 stepped aside
    assert "world size 1 (launcher none" in ranks[0].stdout


def test_killed_rank_fails_the_others_without_torchrun(tmp_path):
    """No torchrun agent to clean up: rank 0 must notice its dead peer (gloo) and exit non-zero, not hang."""
    args = train_args(tmp_path, "kill", 16, "train.epochs=200", "train.dist_timeout=60")
    procs = start_slurm(2, args, slurm_job_id())
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "vitlab" / "kill" / "checkpoints" / "last").is_dir():
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline
            time.sleep(0.2)
        procs[1].kill()
        t = time.monotonic()
        procs[0].wait(timeout=75)
        assert procs[0].returncode != 0 and time.monotonic() - t < 75
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def test_fsdp_refuses_models_with_a_custom_backward():
    from vitlab.train.distributed import parallelize
    model = vitlab.create_model("rev_vit_micro_patch2_8", depth=1)
    with pytest.raises(VitlabError, match="cannot shard RevViT"):
        parallelize(model, torch.device("cpu"), "fsdp", compile=False)


DDP_GRADS_SCRIPT = """
import sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
import vitlab
family, store = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
torch.manual_seed(0)
model = vitlab.create_model(f"{family}_micro_patch2_8", depth=3, num_classes=4)
plain = vitlab.create_model(f"{family}_micro_patch2_8", depth=3, num_classes=4)
plain.load_state_dict(model.state_dict())
ddp = DistributedDataParallel(model)
x = torch.randn(4, 3, 8, 8)
for _ in range(2):  # a parameter DDP never saw would fail the second iteration
    ddp.zero_grad()
    torch.manual_seed(1)
    ddp(x).square().mean().backward()
torch.manual_seed(1)
plain(x).square().mean().backward()
for (name, p), q in zip(model.named_parameters(), plain.parameters()):
    torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
dist.destroy_process_group()
print("ok")
"""


@pytest.mark.parametrize("family", ["rev_vit", "bdia_vit", "momentum_vit"])
def test_memory_efficient_backward_feeds_ddp_block_by_block(family, tmp_path):
    """The invertible stacks hand each block's gradients to autograd from that block's backward step, so
    DDP's reducer sees every parameter (two iterations without 'unfinished reduction' errors) and the
    all-reduced gradients equal a plain model's. In a fresh process: a process group in pytest's own would
    outlive the test."""
    r = subprocess.run([sys.executable, "-c", DDP_GRADS_SCRIPT, family, str(tmp_path / "store")], env=clean_env(),
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_sigterm_to_the_torchrun_agent_saves_mid_run_then_reload_completes(tmp_path):
    """torchrun forwards SIGTERM to its workers; they agree on the stop at the next metrics flush, write
    `last` (mid-epoch) and exit cleanly, and --reload finishes the run."""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}"]
    args = ["-m", "vitlab", "train", "--output", str(tmp_path), *QUICK, "train.epochs=4", "train.batch_size=16",
            "train.log_every=2"]
    run = tmp_path / "vitlab" / "run_01"
    job = subprocess.Popen([*torchrun, *args], env=clean_env(), cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (run / "metrics.jsonl").is_file() or (run / "metrics.jsonl").stat().st_size < 3000:
            assert job.poll() is None and time.monotonic() < deadline, job.stdout.read() if job.poll() else "slow"
            time.sleep(0.1)
        job.send_signal(signal.SIGTERM)
        out = job.communicate(timeout=90)[0]
    finally:
        if job.poll() is None:
            job.kill()
    assert "stopped by SIGTERM" in out, out[-3000:]
    state = torch.load(run / "checkpoints" / "last" / "trainer_state.pt", weights_only=True)
    assert state["step"] > 0 and len(state["rng"]) == 2 and not (run / "results.json").exists()
    resumed = subprocess.run([*torchrun, *args, "--reload"], env=clean_env(), cwd=ROOT, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "results.json").read_text())["epochs"] == 4
