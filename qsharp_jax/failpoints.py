"""Named points of a run where the fault-injection tests kill the process.

A run passes ``reach("<stage>/<iteration>/...")`` at each step of its progress (collection chunks,
the shard and manifest writes, fit chunks, evaluation, the checkpoint, the metrics file). With the
environment variable ``QSHARP_FAILPOINT`` set to one of those names the process sends itself
SIGKILL there — an exact, reproducible crash point instead of a kill after a guessed delay. Unset
(always, outside the tests) it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "QSHARP_FAILPOINT"


def reach(name: str) -> None:
    """Die here, as ``kill -9`` would, if ``QSHARP_FAILPOINT`` names this point."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
