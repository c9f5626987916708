"""The star-graph value warm-up: reward-free edge walks that teach the value model the prompt's
edge relation before Algorithm 1 (at laptop scale outcome labels alone do not find it; the paper's
value model inherits such circuits from pretrained GPT-2). See README.md beside this file."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from qsharp_jax import objectives, train
from qsharp_jax.models.value import ValueModel
from qsharp_jax.tasks.star_graph import GraphConfig, Split, Vocabulary, edges_of


@dataclasses.dataclass(frozen=True)
class ValuePretrainConfig:
    """Reward-free warm-up of the value model before Algorithm 1: on random walks over each training
    prompt's nodes, predict whether each step is an edge of the prompt (:func:`edge_walks`).

    Fields:
      walks: walks (one per sampled training prompt); 0 skips the warm-up.
      epochs: passes over the walks.
      batch_size: walks per optimizer step.
      optimizer: the warm-up's optimizer.
    """

    walks: int = 100_000
    epochs: int = 1
    batch_size: int = 64
    optimizer: train.OptimizerConfig = train.OptimizerConfig(learning_rate=3e-3, weight_decay=0.0, warmup_steps=50)

    def __post_init__(self):
        if self.walks < 0 or self.epochs < 0:
            raise ValueError(f"value_pretrain.walks and .epochs must be >= 0, got {self.walks} and {self.epochs}")


def edge_walks(cfg: GraphConfig, prompts: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Reward-free auxiliary data: after each prompt, a walk ``x1,x2,…,xL`` (L = path_length) over
    the prompt's nodes, each step following one of the current node's edges with probability 1/2
    (when it has one) and jumping to a uniformly drawn node of the graph otherwise. The label of
    node x_i (i ≥ 2) is whether (x_{i−1}, x_i) is an edge of the prompt — read off the prompt alone,
    never from the answer or a reward.

    Returns ``tokens`` int32 ``[n, P + 2L − 1]``, ``attention_mask`` bool, ``loss_mask`` bool (the
    labelled nodes) and ``returns`` float32 (the labels there, 0 elsewhere), all ``[n, T]``.
    """
    prompts = np.asarray(prompts)
    heads, tails = edges_of(cfg, prompts)
    n, walk = len(prompts), cfg.path_length
    nodes = np.concatenate([heads, tails], axis=1)  # every node of the graph (with repeats)
    rows = np.arange(n)

    def any_node():
        return nodes[rows, rng.integers(0, nodes.shape[1], n)]

    suffix = np.full((n, 2 * walk - 1), Vocabulary(cfg.num_nodes).comma, np.int64)
    labels = np.zeros((n, 2 * walk - 1), np.float32)
    labelled = np.zeros((n, 2 * walk - 1), bool)
    current = suffix[:, 0] = any_node()
    for i in range(1, walk):
        out_edges = heads == current[:, None]  # [n, E]
        # one of the current node's edges at random: the largest random score among them
        pick = np.argmax(np.where(out_edges, rng.random(out_edges.shape), -1.0), axis=1)
        follow = out_edges.any(axis=1) & (rng.random(n) < 0.5)
        step = np.where(follow, tails[rows, pick], any_node())
        labels[:, 2 * i] = (out_edges & (tails == step[:, None])).any(axis=1)
        labelled[:, 2 * i] = True
        suffix[:, 2 * i] = current = step
    tokens = np.concatenate([prompts, suffix], axis=1).astype(np.int32)
    pad = np.zeros(prompts.shape, bool)
    return {"tokens": tokens, "attention_mask": np.ones(tokens.shape, bool),
            "loss_mask": np.concatenate([pad, labelled], axis=1),
            "returns": np.concatenate([pad.astype(np.float32), labels], axis=1)}


def walk_loss(model: ValueModel, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The value head's own loss (categorical / Bernoulli / MSE) against per-position labels
    ``batch["returns"] [N, T]`` where ``batch["loss_mask"]``: the edge-walk warm-up's objective."""
    return objectives.value_loss(model, batch)


def pretrain_value(cfg: ValuePretrainConfig, graph: GraphConfig, value: ValueModel, train_split: Split, *,
                   seed: int, progress: bool = True) -> ValueModel:
    """``cfg.epochs`` epochs of the edge-walk objective on walks after training prompts."""
    rng = np.random.default_rng([seed, 6])
    prompts = train_split.prompts[rng.integers(0, len(train_split.prompts), cfg.walks)]
    optimizer = train.make_optimizer(cfg.optimizer)
    state = train.init_state(value, optimizer, jax.random.key(seed + 6))
    walks = edge_walks(graph, prompts, rng)
    objectives.check_returns(walks["returns"], value.head_cfg, "edge-walk labels")
    state, _ = train.fit(state, train.make_train_epoch(walk_loss, optimizer), walks, epochs=cfg.epochs,
                         batch_size=min(cfg.batch_size, cfg.walks), rng=rng, desc="value warm-up (edge walks)",
                         progress=progress)
    return state.model()
