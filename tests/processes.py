"""Several `qsharp` processes on localhost as one multi-host job: each a JAX process with 4 fake CPU
devices, joined through a local coordinator (gloo collectives), as the hosts of a pod would be."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "experiments/planted_token/config.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args_of, *, processes: int = 2, cwds=None, timeout: float = 240, port: int | None = None):
    """Start ``processes`` copies of ``qsharp`` (``args_of(i)``: process i's arguments) as one job;
    returns [(exit code, stdout, stderr)] per process."""
    port = port or free_port()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
           "XLA_FLAGS": "--xla_cpu_use_fusion_emitters=false --xla_force_host_platform_device_count=4",
           "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": str(processes)}
    procs = [subprocess.Popen([sys.executable, "-m", "qsharp_jax.cli", *args_of(i)], cwd=(cwds or [ROOT] * processes)[i],
                              env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for i in range(processes)]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in procs:
            p.kill()
    return results


def printed(stdout: str) -> str:
    """What a command printed, without gloo's connection messages ("[Gloo] Rank i is connected to n
    peer ranks. ..."). Its threads write them unsynchronized, so a message may be split over two lines
    or two may share one line and leave an empty one behind: gloo's lines and empty lines are dropped
    (no command's output is compared on its empty lines)."""
    gloo = re.compile(r"\[Gloo\]|^\d* ?is connected to \d+ peer ranks|peer ranks is : \d+$")
    return "".join(line for line in stdout.splitlines(keepends=True)
                   if line.strip() and not gloo.search(line.strip()))


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?(?:e-?\d+)?", text)]
