"""Policy-training baselines of the paper, each complete (loss, config, training loop) and
task-agnostic: driven by a sampling function and a reward function. REINFORCE
(:mod:`.reinforce`), DPO and RPO (:mod:`.dpo`). CD is Algorithm 1 with ``guidance="cd"``.

The functions they are driven by:

* ``sample_fn(model, prompts, prompt_mask, key) -> rollout.Rollout``: responses of ``model``
  (e.g. ``rollout.generate`` with the experiment's decoding settings);
* ``reward_fn(prompts, completions, mask) -> float [n]``: 1 for a correct response, 0 otherwise
  (a task's ``reward``).
"""

from typing import Callable

import jax
import numpy as np

from qsharp_jax.rollout import Rollout

SampleFn = Callable[[object, np.ndarray, np.ndarray, jax.Array], Rollout]
RewardFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
