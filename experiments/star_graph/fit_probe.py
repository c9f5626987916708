"""Refit a star-graph run's value model on its stored Algorithm 1 rollouts and print, after every
epoch, the held-out cross-entropy of the predicted success probability at each answer position
(chance: the binary entropy of the success rate, 0.69 near 1/2). It shows *where* a value model
learns: after the config's edge-walk warm-up, on G(2, 3) (g2_3.yaml, --lr 3e-3) the loss drops from
the first step's node on, on G(2, 5) (g2_5_small.yaml) it stays at chance everywhere (README § Star graph).

    python -m experiments.star_graph.fit_probe experiments/star_graph/g2_5_small.yaml --lr 1e-3 --epochs 2

Needs the run directory of that config with π_ref's checkpoint and ``qsharp/data`` (run
``python -m experiments.star_graph CONFIG`` first).
"""

import argparse
from pathlib import Path

import jax
import numpy as np

from experiments.star_graph import harness
from experiments.star_graph.warmup import pretrain_value
from qsharp_jax import config, objectives, train
from qsharp_jax.models.build import build_value
from qsharp_jax.models.value import value_from_reference
from qsharp_jax.storage import RolloutStore
from qsharp_jax.tasks import star_graph as sg

KEYS = ("tokens", "attention_mask", "loss_mask", "rewards")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, as for the harness (e.g. seed=1 run_dir=...)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--init", choices=("reference", "scratch"), default="reference")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="skip the config's edge-walk warm-up (value_pretrain) before the fit")
    parser.add_argument("--held-out", type=int, default=6000, help="last rollouts kept out of the fit")
    args = parser.parse_args()

    cfg = config.load(harness.StarGraphConfig, args.config, args.overrides)
    if cfg.head.kind != "categorical" or cfg.head.q_type:
        raise SystemExit(f"fit_probe reads a categorical V-type value head; {args.config} has "
                         f"head kind={cfg.head.kind!r}, q_type={cfg.head.q_type}")
    stored = Path(cfg.run_dir) / "qsharp" / "data"
    if not (stored / "manifest.json").exists():
        raise SystemExit(f"no rollouts in {stored}; run `python -m experiments.star_graph {args.config}` first")
    store = RolloutStore(stored)
    data = {k: v for k, v in store.load().items() if k in KEYS}
    n = len(data["rewards"])
    if n <= args.held_out:
        raise SystemExit(f"{n} stored rollouts, not more than --held-out {args.held_out}")
    held = {k: v[n - args.held_out :] for k, v in data.items()}
    data = {k: v[: n - args.held_out] for k, v in data.items()}

    train_split, _ = sg.make_splits(cfg.graph, train=cfg.train_graphs, test=1, seed=cfg.seed)
    ref = harness.pretrain_reference(cfg, train_split)  # restored from the run's checkpoint
    value = value_from_reference(ref, cfg.head, seed=cfg.value.seed) if args.init == "reference" \
        else build_value(cfg.value, cfg.head)
    if cfg.value_pretrain.walks and not args.no_warm_up:
        value = pretrain_value(cfg.value_pretrain, cfg.graph, value, train_split, seed=cfg.seed)
    optimizer = train.make_optimizer(train.OptimizerConfig(learning_rate=args.lr, weight_decay=0.0,
                                                           warmup_steps=args.warmup_steps))
    state = train.init_state(value, optimizer, jax.random.key(0))
    epoch = train.make_train_epoch(objectives.value_loss, optimizer)
    first = cfg.graph.prompt_length - 1  # the prefix ending at "=": the value before the answer
    positions = range(first, first + cfg.graph.answer_length + 1)
    r = held["rewards"]
    print(f"{len(data['rewards'])} rollouts fitted, {len(r)} held out (success rate {r.mean():.3f})")
    print("epoch  " + " ".join(f"{p - first:>6d}" for p in positions) + "   (answer position; 0 = before it)")

    def report(tag: str) -> None:
        p = harness.success_probabilities(state.model(), held["tokens"], held["attention_mask"])
        ce = harness.position_cross_entropy(p, r, held["attention_mask"], positions)
        print(f"{tag:>5}  " + " ".join(f"{c:6.3f}" for c in ce), flush=True)

    report("init")
    rng = np.random.default_rng(0)
    for e in range(args.epochs):
        state, _ = train.fit(state, epoch, data, epochs=1, batch_size=args.batch_size, rng=rng, desc=f"epoch {e + 1}")
        report(str(e + 1))


if __name__ == "__main__":
    main()
