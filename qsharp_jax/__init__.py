"""qsharp_jax: Q♯ (distributional value guidance for KL-regularized LLM post-training) in JAX/Flax.

The public face, one import away (``from qsharp_jax import generate, losses, ...``):

* the math — :mod:`qsharp_jax.losses` (categorical return / Bellman losses, two-hot) and
  :mod:`qsharp_jax.guidance` (Q♯, CD and Bernoulli logit offsets, ``guided_logits``);
* decoding — :func:`generate` (one jitted loop, plain or value-guided, exact KL) and ``Rollout``;
* Algorithm 1 — :func:`run` and :class:`AlgorithmConfig`, the :class:`Task` protocol and its
  registry (``TASKS``, ``make_task``), ``qsharp train``'s :class:`RunConfig` / :func:`start_or_resume`;
* the value head's config :class:`HeadConfig` (kind, atoms);
* pods — :mod:`qsharp_jax.distributed` (``initialize()``: one process per host, first thing).

Everything else lives in its module: models (:mod:`qsharp_jax.models`), training
(:mod:`qsharp_jax.train`, :mod:`qsharp_jax.objectives`), baselines (:mod:`qsharp_jax.baselines`),
tasks (:mod:`qsharp_jax.tasks`), storage, checkpoints, sharding, configs, the CLI.

Names are resolved on first use, so importing one light module (``qsharp_jax.storage``,
``qsharp_jax.config``) does not load JAX.
"""

import importlib

# public name -> (module, attribute or None for the module itself)
_PUBLIC = {
    "losses": ("qsharp_jax.losses", None),
    "guidance": ("qsharp_jax.guidance", None),
    "generate": ("qsharp_jax.rollout", "generate"),
    "Rollout": ("qsharp_jax.rollout", "Rollout"),
    "run": ("qsharp_jax.algorithm", "run"),
    "AlgorithmConfig": ("qsharp_jax.algorithm", "AlgorithmConfig"),
    "Task": ("qsharp_jax.tasks", "Task"),
    "TASKS": ("qsharp_jax.tasks", "TASKS"),
    "make_task": ("qsharp_jax.tasks", "make_task"),
    "RunConfig": ("qsharp_jax.runs", "RunConfig"),
    "start_or_resume": ("qsharp_jax.runs", "start_or_resume"),
    "HeadConfig": ("qsharp_jax.models.value", "HeadConfig"),
    "distributed": ("qsharp_jax.distributed", None),
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'qsharp_jax' has no attribute {name!r}")
    module, attribute = _PUBLIC[name]
    value = importlib.import_module(module)
    return value if attribute is None else getattr(value, attribute)


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
