"""Checkpoints of the train state and the driver's progress, with orbax's ``CheckpointManager``.

``Checkpoints(dir).save(iteration, state, meta)`` writes the value model's parameters, optimizer
state, step and PRNG key plus a JSON ``meta`` (iteration, config, data cursor, metrics) and keeps the
last ``keep``. Orbax writes into a temporary directory and renames it when complete, so a killed
save is never listed. ``restore`` checks the saved config against the current one (naming the
fields that differ) and falls back to the previous checkpoint, with a warning, if the newest one
cannot be read.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp

from qsharp_jax import config as config_lib
from qsharp_jax.train import TrainState


def _arrays(state: TrainState) -> dict[str, Any]:
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step,
            "rng": jax.random.key_data(state.rng)}


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False),
            item_names=("state", "meta"),
        )

    def steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, iteration: int, state: TrainState, meta: dict[str, Any]) -> None:
        """Save synchronously: when this returns, the checkpoint is complete on disk."""
        self._manager.save(
            iteration,
            args=ocp.args.Composite(state=ocp.args.StandardSave(_arrays(state)), meta=ocp.args.JsonSave(meta)),
        )
        self._manager.wait_until_finished()

    def restore(self, template: TrainState, config: dict[str, Any] | None = None, *, ignore: Sequence[str] = ()
                ) -> tuple[TrainState, dict] | None:
        """The newest readable checkpoint restored into ``template``'s structure and shardings.

        Returns None when there is none. Raises ValueError if ``config`` differs from the saved one
        in a field not in ``ignore`` (dotted names).
        """
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
            _arrays(template),
        )

        def read(step: int, **items):
            try:
                return self._manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint: try the previous one
                warnings.warn(f"checkpoint {step} in {self.directory} cannot be read ({error!r}); "
                              "falling back to the previous one", stacklevel=3)
                return None

        for step in reversed(self.steps()):
            # the config first: a run of another config may not even fit the template's shapes
            restored = read(step, meta=ocp.args.JsonRestore())
            if restored is None:
                continue
            meta = restored["meta"]
            if config is not None:
                config_lib.check_same(meta.get("config") or {}, config, f"checkpoint {step} in {self.directory}", ignore)
            restored = read(step, state=ocp.args.StandardRestore(abstract))
            if restored is None:
                continue
            arrays = restored["state"]
            state = template.replace(
                params=arrays["params"], opt_state=arrays["opt_state"], step=arrays["step"],
                rng=jax.random.wrap_key_data(arrays["rng"]),
            )
            return state, meta
        return None
