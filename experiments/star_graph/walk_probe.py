"""How fast a fresh value model learns the star graph's reward-free edge check (is each step of a
random walk after the prompt an edge of the prompt? :func:`warmup.edge_walks`), with and without
an architecture option — the first look-up the outcome value needs. Prints held-out accuracy on
1,000 unseen graphs' walks every ``--every`` steps (chance ≈ 0.5).

    python -m experiments.star_graph.walk_probe --qk-identity 3 --seed 1
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.star_graph import warmup
from qsharp_jax import train
from qsharp_jax.models.build import ModelSpec, build_value
from qsharp_jax.models.value import HeadConfig
from qsharp_jax.tasks import star_graph as sg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--degree", type=int, default=2)
    parser.add_argument("--path-length", type=int, default=5)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--qk-identity", type=float, default=0.0, help="ModelSpec.qk_identity (0: random init)")
    parser.add_argument("--steps", type=int, default=640)
    parser.add_argument("--every", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=1, help="of the value model's init and the walks")
    args = parser.parse_args()

    graph = sg.GraphConfig(degree=args.degree, path_length=args.path_length, num_nodes=50)
    head = HeadConfig("categorical", 11)
    train_split, test_split = sg.make_splits(graph, train=50_000, test=1_000, seed=0)
    spec = ModelSpec(architecture="gpt2", vocab_size=sg.Vocabulary(graph.num_nodes).size, hidden_size=args.width,
                     num_layers=args.layers, num_heads=args.heads, mlp_dim=4 * args.width,
                     max_positions=graph.prompt_length + 2 * graph.path_length, seed=args.seed,
                     qk_identity=args.qk_identity)
    held = warmup.edge_walks(graph, test_split.prompts, np.random.default_rng([args.seed, 1]))
    p_edge = jax.jit(lambda m, t, a: jax.nn.softmax(m(t, a)) @ head.atoms)

    def accuracy(model) -> float:
        p = np.asarray(p_edge(model, jnp.asarray(held["tokens"]), jnp.asarray(held["attention_mask"])))
        m = held["loss_mask"]
        return float(((p[m] > 0.5) == (held["returns"][m] > 0.5)).mean())

    optimizer = train.make_optimizer(train.OptimizerConfig(learning_rate=args.lr, weight_decay=0.0, warmup_steps=50))
    state = train.init_state(build_value(spec, head), optimizer, jax.random.key(args.seed))
    epoch = train.make_train_epoch(warmup.walk_loss, optimizer)
    rng = np.random.default_rng([args.seed, 2])
    started = time.time()
    print(f"G({args.degree}, {args.path_length}), {args.layers}×{args.width}, qk_identity={args.qk_identity:g}, "
          f"seed {args.seed}: step 0 accuracy {accuracy(state.model()):.3f}", flush=True)
    for done in range(args.every, args.steps + 1, args.every):
        prompts = train_split.prompts[rng.integers(0, len(train_split.prompts), args.every * args.batch_size)]
        state, _ = train.fit(state, epoch, warmup.edge_walks(graph, prompts, rng), epochs=1,
                             batch_size=args.batch_size, rng=rng, progress=False)
        print(f"step {done}: accuracy {accuracy(state.model()):.3f} ({time.time() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
