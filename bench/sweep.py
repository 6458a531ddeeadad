"""Wall time of the experiments workflow on the digits quickstart (issue 6's targets: a 2x2 sweep that trains,
collects and plots in < 3 minutes on 2 CPU cores; a repeated sweep over finished runs in < 10 s).

    python bench/sweep.py [--output DIR]      # DIR is emptied first (default: a temporary folder)

Each step is the real `vitlab` command in a fresh process, timed end to end (interpreter start included).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(args: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vitlab", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output")
    args = p.parse_args()
    out = Path(args.output or tempfile.mkdtemp(prefix="vitlab-sweep-")) / "quickstart_2x2"
    shutil.rmtree(out, ignore_errors=True)
    spec = str(ROOT / "configs" / "sweeps" / "quickstart_2x2.yaml")
    steps = [("sweep (4 runs)", ["sweep", spec, "--output", str(out)]),
             ("collect", ["collect", str(out)]),
             ("plot", ["plot", str(out), "--out", str(out / "plots")]),
             ("sweep again (all finished)", ["sweep", spec, "--output", str(out)])]
    print("| step | seconds |\n|---|---:|")
    total = 0.0
    for i, (name, argv) in enumerate(steps):
        seconds = timed(argv)
        total += seconds if i < 3 else 0.0
        print(f"| {name} | {seconds:.1f} |", flush=True)
    print(f"| **sweep + collect + plot** (target < 180) | **{total:.1f}** |")


if __name__ == "__main__":
    main()
