"""How often Q♯'s first step would be right if guidance read each candidate's value one π_ref step
later — measured offline on a finished star-graph run, without a new decoding loop.

For each test graph, at the first decision (after "src,"), π_ref's top-k first nodes y are scored
two ways by the run's final value model: as guided decoding does today, Q(x, y)/η = log E_p(x y)
[exp(Z/η)], and one step later through π_ref, exp(Q(x, y)/η) = Σ_c π̃_ref(c | x y) ·
E_p(x y c)[exp(Z/η)] over π_ref's top-k′ continuations c (renormalized), the Bellman equation of
the same value. Prints the probability that each policy — π_ref, Q♯ as today, Q♯ with the look-ahead
— takes the right first node, averaged over the test graphs (top-k sampling, temperature 1), and
the value's cross-entropy after the first node and after the comma that follows it (the harness's
``fit_by_position``), and the test accuracy of the same guidance decoded by ``rollout.generate``
without and with ``lookahead=1`` (the look-ahead in the decoding loop).

    python -m experiments.star_graph.lookahead_probe experiments/star_graph/g2_3.yaml run_dir=runs/demo_s1 seed=1
"""

import argparse
import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from experiments.star_graph import harness
from qsharp_jax import algorithm, config, guidance
from qsharp_jax.models.value import value_from_reference
from qsharp_jax.tasks import star_graph as sg


def _top(model, tokens: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """π_ref's top-k next tokens after ``tokens [N, T]`` and their log-probabilities ``[N, k]``."""
    logp = jax.nn.log_softmax(model(tokens)[:, -1], axis=-1)
    top, ids = jax.lax.top_k(logp, k)
    return ids, top


def first_step(ref, value, prompts: np.ndarray, answers: np.ndarray, *, eta: float, top_k: int, batch: int = 500):
    """``(p_ref, p_qsharp, p_lookahead)``: per graph, the probability of the right first node."""
    atoms = value.head_cfg.atoms

    @jax.jit
    def probs(ref, value, prefix, right):
        n = prefix.shape[0]
        ids, ref_top = _top(ref, prefix, top_k)  # [N, k]
        seq = jnp.concatenate([jnp.repeat(prefix, top_k, 0), ids.reshape(-1, 1)], axis=1)  # [N·k, T+1]
        now = guidance.qsharp_logit_offset(value(seq)[:, -1], atoms, eta).reshape(n, top_k)
        nxt, nxt_logp = _top(ref, seq, top_k)  # π_ref's continuations of each candidate
        deeper = jnp.concatenate([jnp.repeat(seq, top_k, 0), nxt.reshape(-1, 1)], axis=1)
        later = guidance.qsharp_logit_offset(value(deeper)[:, -1], atoms, eta).reshape(n * top_k, top_k)
        ahead = jax.nn.logsumexp(jax.nn.log_softmax(nxt_logp, axis=-1) + later, axis=-1).reshape(n, top_k)
        hit = ids == right[:, None]
        share = lambda logits: jnp.sum(jnp.where(hit, jax.nn.softmax(logits, axis=-1), 0.0), axis=-1)  # noqa: E731
        return share(ref_top), share(ref_top + now), share(ref_top + ahead)

    # the answer is "src , n1 , …": the decision is after its first two tokens
    prefix = np.concatenate([prompts, answers[:, :2]], axis=1)
    out = [probs(ref, value, jnp.asarray(prefix[i:i + batch]), jnp.asarray(answers[i:i + batch, 2]))
           for i in range(0, len(prompts), batch)]
    return tuple(np.concatenate([np.asarray(o[j]) for o in out]) for j in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, as for the harness")
    args = parser.parse_args()
    cfg = config.load(harness.StarGraphConfig, args.config, args.overrides)
    if cfg.head.q_type or cfg.head.kind != "categorical":
        raise SystemExit("lookahead_probe reads a categorical V-type value head")
    train_split, test_split = sg.make_splits(cfg.graph, train=cfg.train_graphs, test=cfg.test_graphs, seed=cfg.seed)
    ref = harness.pretrain_reference(cfg, train_split, progress=False)  # restored from the run
    value = value_from_reference(ref, cfg.head, seed=cfg.value.seed)
    state, meta = algorithm.latest_state(cfg.qsharp, value, Path(cfg.run_dir) / "qsharp")
    p_ref, p_now, p_ahead = first_step(ref, state.model(), test_split.prompts, test_split.answers,
                                       eta=cfg.qsharp.eta, top_k=cfg.evaluation.top_k)
    fit = harness.fit_by_position(cfg, ref, test_split)(state.model(), 0)
    decoded = {steps: harness.evaluate(dataclasses.replace(cfg, qsharp=dataclasses.replace(cfg.qsharp, lookahead=steps)),
                                      test_split, ref, value_model=state.model(), guidance="qsharp", progress=False)
               for steps in (0, 1)}
    print(f"{len(p_ref)} test graphs of G({cfg.graph.degree}, {cfg.graph.path_length}), value model after "
          f"iteration {meta.get('iteration')}, η = {cfg.qsharp.eta}, top-k {cfg.evaluation.top_k}: probability of the "
          f"right first node — π_ref {p_ref.mean():.3f}, Q♯ {p_now.mean():.3f}, Q♯ with one-step look-ahead "
          f"{p_ahead.mean():.3f}; value cross-entropy after the first node {fit['value_ce_3']:.3f}, after its comma "
          f"{fit['value_ce_4']:.3f} (chance {fit['value_ce_chance']:.3f}); decoded by rollout.generate, test accuracy "
          f"(KL): Q♯ {decoded[0]['test_accuracy']:.3f} ({decoded[0]['kl']:.3f}), with lookahead=1 "
          f"{decoded[1]['test_accuracy']:.3f} ({decoded[1]['kl']:.3f})")


if __name__ == "__main__":
    main()
