"""How fast a fresh value model learns what Q♯'s star-graph value needs, with and without the
value model's architecture options (``ModelSpec.qk_identity``, ``ModelSpec.token_shift``):

* ``--labels edges``: the reward-free edge check (is each step of a random walk after the prompt
  an edge of the prompt? :func:`warmup.edge_walks`) — the first look-up the outcome value needs;
  prints held-out accuracy (chance ≈ 0.5).
* ``--labels reach --hops k``: on the same simulated answers, at each answer node, whether the
  goal is reachable from it within k edges (read off the prompt: no reward) — a look-ahead
  curriculum's k-th stage; prints held-out accuracy at each node of the answer.
* ``--labels outcome``: the outcome value itself, on answers of a shortcut π_ref simulated exactly
  (a uniformly drawn first step, then along that arm, the goal copied last, as the pretrained π_ref
  of ``make demo`` does), labelled by correctness at every answer position; prints the held-out
  cross-entropy per answer position (0: before the answer; chance ln 2 ≈ 0.693 on G(2, ·)).

Fresh graphs every step (training prompts drawn from 50k), 1,000 unseen test graphs. Diagnostic
variants (measured, not kept as package options: none moved the positions before the goal):
``--tied-shift`` starts the token-shift embedding as a copy of the token embedding (so a pair in one
position matches either token), ``--identity-ov`` starts every value and output projection as the
identity (attention starts by copying what it matches), ``--q-type`` fits a Q-type head (the value
of every next token read at the previous position; position t's column is Q(t − 1, token t)).

    python -m experiments.star_graph.walk_probe --qk-identity 3 --token-shift 2 --seed 1
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.star_graph import harness, warmup
from qsharp_jax import objectives, train
from qsharp_jax.models.build import ModelSpec, build_value
from qsharp_jax.models.value import HeadConfig, ValueModel
from qsharp_jax.tasks import star_graph as sg


def shortcut_answers(cfg: sg.GraphConfig, split: sg.Split, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A shortcut π_ref's answer to each graph of ``split`` (first step uniform over the arms, then
    along it, the goal last) as value-fit data: ``tokens`` / ``attention_mask`` / ``loss_mask``
    ``[n, P + A]`` (the loss on every prefix from the prompt's "=" on) and 0/1 ``rewards [n]``."""
    g, n = split.graphs, len(split.prompts)
    arm = rng.integers(0, cfg.degree, n)
    path = g.arms[np.arange(n), arm].copy()
    path[:, -1] = g.goal
    answers = sg.encode_answers(cfg, path)
    tokens = np.concatenate([split.prompts, answers], axis=1)
    loss_mask = np.zeros(tokens.shape, bool)
    loss_mask[:, cfg.prompt_length - 1:] = True
    return {"tokens": tokens, "attention_mask": np.ones(tokens.shape, bool), "loss_mask": loss_mask,
            "rewards": (answers == split.answers).all(axis=1).astype(np.float32)}


def reach_labels(cfg: sg.GraphConfig, data: dict[str, np.ndarray], hops: int) -> dict[str, np.ndarray]:
    """:func:`shortcut_answers`' data relabelled: at the prefix ending at answer node j, whether the
    goal is within ``hops`` edges of that node (per-position ``returns``; ``loss_mask`` at the nodes
    only). On a shortcut answer node j is L − 1 − j edges from the goal when the answer took the
    goal's arm (or j = 0, the source), and unreachable otherwise; the last node is the goal."""
    length = cfg.path_length
    j = np.arange(length)[None]
    on_arm = (data["rewards"][:, None] > 0) | (j == 0) | (j == length - 1)
    reachable = on_arm & (length - 1 - j <= hops)
    returns = np.zeros(data["tokens"].shape, np.float32)
    loss_mask = np.zeros(data["tokens"].shape, bool)
    columns = cfg.prompt_length + 2 * np.arange(length)  # each answer node's own position
    returns[:, columns] = reachable
    loss_mask[:, columns] = True
    return {"tokens": data["tokens"], "attention_mask": data["attention_mask"], "loss_mask": loss_mask,
            "returns": returns}


def start_variant(value: ValueModel, *, tied_shift: bool, identity_ov: bool) -> ValueModel:
    """The diagnostic initializations of ``--tied-shift`` and ``--identity-ov`` (in place)."""
    model = value.backbone
    if tied_shift:
        if not model.cfg.token_shift:
            raise SystemExit("--tied-shift needs --token-shift")
        model.shift_embed[...] = jnp.array(model.embed[...], copy=True)
    if identity_ov:
        E, H, K, D = model.cfg.hidden_size, model.cfg.num_heads, model.cfg.num_kv_heads, model.cfg.head_dim
        if H * D != E or K != H:
            raise SystemExit("--identity-ov needs heads · head_dim == width")
        for block in model.layers:
            block.v[...] = jnp.eye(E).reshape(block.v[...].shape)
            block.o[...] = jnp.eye(E).reshape(block.o[...].shape)
    return value


@jax.jit
def _taken_success(model: ValueModel, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """A Q-type model's success probability of each taken token, in that token's column ``[N, T]``
    (column 0, which no Q-value scores: 0.5)."""
    out = model(tokens, mask)[:, :-1]  # [N, T-1, V, K]
    taken = jnp.take_along_axis(out, tokens[:, 1:, None, None], axis=2)[:, :, 0]
    p = jax.nn.softmax(taken) @ model.head_cfg.atoms
    return jnp.concatenate([jnp.full((tokens.shape[0], 1), 0.5), p], axis=1)


def success(model: ValueModel, tokens: np.ndarray, mask: np.ndarray, batch: int = 250) -> np.ndarray:
    """Success probabilities ``[N, T]`` of a V-type (the prefix ending at t) or Q-type (token t taken
    after the prefix ending at t − 1) categorical value model."""
    if not model.head_cfg.q_type:
        return harness.success_probabilities(model, tokens, mask)
    return np.concatenate([np.asarray(_taken_success(model, jnp.asarray(tokens[i:i + batch]), jnp.asarray(mask[i:i + batch])))
                           for i in range(0, len(tokens), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", choices=("edges", "reach", "outcome"), default="edges")
    parser.add_argument("--hops", type=int, default=1, help="with --labels reach")
    parser.add_argument("--degree", type=int, default=2)
    parser.add_argument("--path-length", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--qk-identity", type=float, default=0.0, help="ModelSpec.qk_identity (0: random init)")
    parser.add_argument("--token-shift", type=int, default=0, help="ModelSpec.token_shift (0: none)")
    parser.add_argument("--tied-shift", action="store_true", help="token-shift embedding starts as the token embedding")
    parser.add_argument("--identity-ov", action="store_true", help="value/output projections start as the identity")
    parser.add_argument("--q-type", action="store_true", help="a Q-type value head (with --labels outcome)")
    parser.add_argument("--steps", type=int, default=640)
    parser.add_argument("--every", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1, help="of the value model's init and the data")
    args = parser.parse_args()

    graph = sg.GraphConfig(degree=args.degree, path_length=args.path_length, num_nodes=50)
    if args.q_type and args.labels != "outcome":
        raise SystemExit("--q-type is for --labels outcome")
    head = HeadConfig("categorical", 11, q_type=args.q_type)
    train_split, test_split = sg.make_splits(graph, train=50_000, test=1_000, seed=0)
    spec = ModelSpec(architecture="gpt2", vocab_size=sg.Vocabulary(graph.num_nodes).size, hidden_size=args.width,
                     num_layers=args.layers, num_heads=args.heads, mlp_dim=4 * args.width,
                     max_positions=graph.prompt_length + 2 * graph.path_length, seed=args.seed,
                     qk_identity=args.qk_identity, token_shift=args.token_shift)
    rng = np.random.default_rng([args.seed, 2])
    if args.labels == "edges":
        def make_data(split):
            return warmup.edge_walks(graph, split.prompts, rng)
        loss = warmup.walk_loss
    elif args.labels == "reach":
        def make_data(split):
            return reach_labels(graph, shortcut_answers(graph, split, rng), args.hops)
        loss = warmup.walk_loss
    else:
        def make_data(split):
            return shortcut_answers(graph, split, rng)
        loss = objectives.value_loss
    held = make_data(test_split)
    first = graph.prompt_length - 1

    def score(model) -> str:
        p = success(model, held["tokens"], held["attention_mask"])
        if args.labels == "edges":
            m = held["loss_mask"]
            return f"accuracy {((p[m] > 0.5) == (held['returns'][m] > 0.5)).mean():.3f}"
        if args.labels == "reach":
            columns = graph.prompt_length + 2 * np.arange(graph.path_length)
            right = (p[:, columns] > 0.5) == (held["returns"][:, columns] > 0.5)
            return "accuracy by answer node " + " ".join(f"{a:.3f}" for a in right.mean(0))
        positions = range(first, first + graph.answer_length + 1)
        ce = harness.position_cross_entropy(p, held["rewards"], held["attention_mask"], positions)
        return "cross-entropy by answer position " + " ".join(f"{c:.3f}" for c in ce)

    optimizer = train.make_optimizer(train.OptimizerConfig(learning_rate=args.lr, weight_decay=0.0, warmup_steps=50))
    value = start_variant(build_value(spec, head), tied_shift=args.tied_shift, identity_ov=args.identity_ov)
    state = train.init_state(value, optimizer, jax.random.key(args.seed))
    epoch = train.make_train_epoch(loss, optimizer)
    started = time.time()
    print(f"{args.labels}, G({args.degree}, {args.path_length}), {args.layers}×{args.width}, "
          f"qk_identity={args.qk_identity:g}, token_shift={args.token_shift}"
          + "".join(f", {flag}" for flag in ("tied_shift", "identity_ov", "q_type") if getattr(args, flag))
          + f", seed {args.seed}: step 0 "
          f"{score(state.model())}", flush=True)
    for done in range(args.every, args.steps + 1, args.every):
        rows = rng.integers(0, len(train_split.prompts), args.every * args.batch_size)
        state, _ = train.fit(state, epoch, make_data(train_split.take(rows)), epochs=1, batch_size=args.batch_size,
                             rng=rng, progress=False)
        print(f"step {done}: {score(state.model())} ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
