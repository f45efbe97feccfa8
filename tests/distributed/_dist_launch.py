"""Launching two JAX processes on this machine (loopback coordinator, gloo CPU collectives,
4 simulated devices each) for the two-process tests: the explicit start-up of
`caspo_jax.distributed.start` (JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

# single-threaded Eigen: 2 processes x 4 devices on 2 cores ran 73 s instead of 113-147 s
XLA_FLAGS = "--xla_force_host_platform_device_count=4 --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two(argv: list[str], logs_dir, timeout: int = 300, xla_flags: str = XLA_FLAGS) -> list[Path]:
    """Runs `argv` as process 0 and 1 of one job at once; returns their log files.

    Logs go to files (gloo is chatty: a pipe nobody drains would fill and block one
    process inside a collective, hanging both). On timeout the processes get SIGUSR1
    (a `faulthandler.register` in them dumps every thread's stack into the log) and the
    test fails with both logs' tails."""
    port = free_port()
    procs, logs = [], []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags,
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
        logs.append(Path(logs_dir) / f"process{pid}.log")
        with open(logs[-1], "w") as log:
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in procs:  # Python stacks of every thread into the logs, then fail with them
            if p.poll() is None:
                p.send_signal(signal.SIGUSR1)
        time.sleep(3)
        stacks = "\n".join(f"--- process {i} ---\n{log.read_text()[-6000:]}" for i, log in enumerate(logs))
        pytest.fail(f"two-process run exceeded {timeout} s:\n{stacks}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for pid, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {pid} failed:\n{log.read_text()[-4000:]}"
    return logs
