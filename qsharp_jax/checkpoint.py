"""Checkpoints of the train state and the driver's progress, with orbax's ``CheckpointManager``,
verified like the data store.

``Checkpoints(dir).save(iteration, state, meta)`` writes the value model's parameters, optimizer
state, step and PRNG key plus a JSON ``meta`` (iteration, config, metrics) and keeps the last
``keep``. Orbax writes into a temporary directory and renames it when complete; then the sha256 of
every file of the step is written (atomically) to ``<step>/checksums.json``. ``restore`` verifies
those checksums before orbax reads a byte, so a flipped bit, a truncated or missing file, or a step
killed before its checksums were written is skipped with a warning naming it, and the previous
checkpoint is used. With ``quarantine=True`` (the training driver) a skipped step is moved to
``<dir>-corrupt/`` (kept, never deleted) so that its iteration is redone and saved for real.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp

from qsharp_jax import config as config_lib
from qsharp_jax import distributed, failpoints
from qsharp_jax.storage import aside_name, atomic_write, sha256
from qsharp_jax.train import TrainState

CHECKSUMS = "checksums.json"


def _arrays(state: TrainState) -> dict[str, Any]:
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step,
            "rng": jax.random.key_data(state.rng)}


def _files(step_dir: Path) -> list[Path]:
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != CHECKSUMS)


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int = 2, *, writer: bool = False):
        """``writer``: this process owns the directory (holds the run's lock), so the temporary
        directories of a save killed midway are removed; readers leave them alone."""
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False,
                                                 cleanup_tmp_directories=writer),
            item_names=("state", "meta"),
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, iteration: int, state: TrainState, meta: dict[str, Any]) -> None:
        """Save synchronously: when this returns, the checkpoint and its checksums are on disk."""
        if iteration in self.steps():
            raise ValueError(f"checkpoint {iteration} already exists in {self.directory}; a step is written once "
                             "(restore(quarantine=True) moves a corrupt one aside before it is redone)")
        failpoints.reach(f"checkpoint/{iteration}/save")
        saved = self._manager.save(
            iteration,
            args=ocp.args.Composite(state=ocp.args.StandardSave(_arrays(state)), meta=ocp.args.JsonSave(meta)),
        )
        self._manager.wait_until_finished()
        if not saved:
            raise RuntimeError(f"orbax declined to save step {iteration} in {self.directory} (steps there: "
                               f"{self.steps()})")
        step_dir = self.directory / str(iteration)

        def write_checksums():  # on a pod every process saves its shards; one writes the checksums
            sums = {str(p.relative_to(step_dir)): sha256(p) for p in _files(step_dir)}
            atomic_write(step_dir / CHECKSUMS, lambda f: f.write(json.dumps(sums, indent=1).encode()),
                         failpoint=f"checkpoint/{iteration}/checksums")

        distributed.on_main(f"checkpoint/{iteration}/checksums", write_checksums)

    def verify(self, step: int) -> str | None:
        """None if every file of checkpoint ``step`` matches its checksum, else what is wrong."""
        step_dir = self.directory / str(step)
        try:
            sums = json.loads((step_dir / CHECKSUMS).read_text())
        except FileNotFoundError:
            return (f"{CHECKSUMS} is missing (the save was interrupted or is still being written, or a release before "
                    "checksums wrote it)")
        except (OSError, ValueError) as error:
            return f"{CHECKSUMS} cannot be read ({error})"
        present = {str(p.relative_to(step_dir)) for p in _files(step_dir)}
        missing = sorted(set(sums) - present)
        if missing:
            return f"file {missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        for name, digest in sums.items():
            if sha256(step_dir / name) != digest:
                return f"file {name} is corrupt (checksum mismatch)"
        return None

    def restore(self, template: TrainState, config: dict[str, Any] | None = None, *, ignore: Sequence[str] = (),
                defaults: dict[str, Any] | None = None, quarantine: bool = False) -> tuple[TrainState, dict] | None:
        """The newest verified checkpoint restored into ``template``'s structure and shardings.

        Returns None when there is none. A checkpoint that fails verification is skipped with a
        warning (and, with ``quarantine``, moved to ``<dir>-corrupt/``). Raises ValueError if
        ``config`` differs from the saved one in a field not in ``ignore`` (dotted names; a field
        the saved config lacks counts as its value in ``defaults``).
        """
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            _arrays(template),
        )
        for step in reversed(self.steps()):
            problem = self.verify(step)
            if problem is None:
                # the config first: a run of another config may not even fit the template's shapes
                meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
                if config is not None:
                    config_lib.check_same(meta.get("config") or {}, config, f"checkpoint {step} in {self.directory}",
                                          ignore, defaults)
                arrays = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
                arrays = arrays["state"]
                state = template.replace(
                    params=arrays["params"], opt_state=arrays["opt_state"], step=arrays["step"],
                    rng=jax.random.wrap_key_data(arrays["rng"]),
                )
                return state, meta
            where = f"checkpoint {step} in {self.directory}"
            distributed.barrier(f"checkpoint/{step}/verified")  # every process has judged it before one moves it
            if quarantine:
                moved = self._quarantine(step)
                warnings.warn(f"{where} is unusable: {problem}; moved to {moved}, falling back to the previous "
                              "checkpoint (its iterations are redone)", stacklevel=2)
            else:
                warnings.warn(f"{where} is unusable: {problem}; falling back to the previous checkpoint",
                              stacklevel=2)
        return None

    def _quarantine(self, step: int) -> Path:
        target = self.directory.parent / f"{self.directory.name}-corrupt" / aside_name(str(step))

        def move():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(self.directory / str(step), target)

        distributed.on_main(f"checkpoint/{step}/quarantined", move)
        self._manager.reload()
        return target
