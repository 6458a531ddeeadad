"""Stopping on request: SIGTERM, SIGINT and SIGUSR1 (SLURM's warning before a time limit or preemption) end
the run after the current optimizer step with `checkpoints/last` written; SIGUSR1 also requeues the SLURM job
and exits with PREEMPTED_EXIT so that a wrapper knows to resume."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from typing import Callable

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped by SIGUSR1 (preemption / time limit), checkpoint saved, resume later
# Whether a training loop has taken over the stop signals in this process: `vitlab train` (the CLI) catches them
# from its first instant and, for a signal it catches, says "before training began" or "after training" by this.
training_began = False


@contextlib.contextmanager
def stop_signals(note: Callable[[int], None]):
    """While inside, each stop signal calls `note(signum)` (the loop stops after the current optimizer step);
    a second signal of the same kind acts as if no handler were installed at all (SIGTERM and SIGUSR1 end the
    process, SIGINT raises KeyboardInterrupt; the save under way is atomic, the previous checkpoint stays),
    whatever handler was there before. Only the main thread can catch signals: elsewhere this does nothing."""
    global training_began
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    training_began = True

    def handler(signum, frame):
        note(signum)
        # the next one is not caught (not by the handler `vitlab train` had before the loop either)
        signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    for sig in STOP_SIGNALS:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stop_message(signum: int, where: str, main: bool) -> tuple[str, int]:
    """(the run's last line, the exit code) for a stop by `signum` at `where` ('epoch 2, batch 5, step 37')."""
    name = signal.Signals(signum).name
    if signum == signal.SIGUSR1:  # preemption: requeue under SLURM, exit with the documented code
        requeued = requeue_slurm_job() if main else ""
        return f"{name} (preemption) at {where}: saved checkpoints/last{requeued}; resume with --reload", PREEMPTED_EXIT
    return f"stopped by {name} at {where}: saved checkpoints/last; resume with --reload", 0


def requeue_slurm_job() -> str:
    """`scontrol requeue` this SLURM job (the sbatch script allows it with --requeue); what happened, as a
    phrase for the stop line ('' outside SLURM)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID", os.environ.get("SLURM_JOB_ID"))
    if not job:
        return ""
    if "SLURM_ARRAY_TASK_ID" in os.environ:
        job = f"{job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"; scontrol requeue {job} failed ({type(exc).__name__})"
    if done.returncode == 0:
        return f"; requeued SLURM job {job}"
    why = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
    return f"; scontrol requeue {job} failed: {why}"
