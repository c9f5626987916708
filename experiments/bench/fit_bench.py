"""Value-fit throughput, side by side in one run: one jitted step per batch from a Python loop vs
the same steps in jitted ``lax.scan`` chunks (``train.make_train_epoch``, what the Algorithm 1 driver
uses). Both fit the same batches from the same state, so their results agree.

Usage: python experiments/bench/fit_bench.py [--steps 1000] [--batch 32] [--chunk 200]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from qsharp_jax import objectives, train
from qsharp_jax.models.build import ModelSpec, build_value
from qsharp_jax.models.value import HeadConfig

SHAPES = {"demo 2x32": (2, 32, 4), "4x64": (4, 64, 4)}  # the star-graph demo's value model and a larger one


def data(steps: int, batch: int, length: int = 26, vocab: int = 56) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    n = steps * batch
    loss_mask = np.zeros((n, length), bool)
    loss_mask[:, length - 7 :] = True
    return {"tokens": rng.integers(0, vocab, (n, length)).astype(np.int32), "attention_mask": np.ones((n, length), bool),
            "loss_mask": loss_mask, "rewards": rng.integers(0, 2, n).astype(np.float32)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=200)
    args = parser.parse_args()
    examples = data(args.steps, args.batch)
    optimizer = train.make_optimizer(train.OptimizerConfig(learning_rate=1e-3, weight_decay=0.0))
    loss_fn = objectives.value_loss
    print(f"{args.steps} steps of {args.batch} sequences, {jax.devices()[0].platform}")
    for name, (layers, width, heads) in SHAPES.items():
        spec = ModelSpec(architecture="gpt2", vocab_size=56, hidden_size=width, num_layers=layers, num_heads=heads,
                         mlp_dim=2 * width, max_positions=32)
        fresh = lambda: train.init_state(build_value(spec, HeadConfig()), optimizer, jax.random.key(0))  # noqa: E731
        step = train.make_train_step(loss_fn, optimizer)
        epoch = train.make_train_epoch(loss_fn, optimizer)
        batches = [{k: v[i * args.batch : (i + 1) * args.batch] for k, v in examples.items()} for i in range(args.steps)]

        def loop(state):
            for batch in batches:
                state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
            return state, metrics["loss"]

        def scanned(state):
            for start in range(0, args.steps, args.chunk):
                chunk = {k: jnp.asarray(v[start * args.batch : (start + args.chunk) * args.batch].reshape(
                    -1, args.batch, *v.shape[1:])) for k, v in examples.items()}
                state, metrics = epoch(state, chunk)
            return state, metrics["loss"][-1]

        seconds = {}
        for label, fit in (("python loop of jitted steps", loop), ("lax.scan chunks", scanned)):
            fit(fresh())  # compile
            start = time.perf_counter()
            _, loss = fit(fresh())
            jax.block_until_ready(loss)
            seconds[label] = time.perf_counter() - start
            print(f"  {name:10s} {label:28s} {args.steps / seconds[label]:8.0f} steps/s  (last loss {float(loss):.4f})")
        print(f"  {name:10s} speed-up of the scan: {seconds['python loop of jitted steps'] / seconds['lax.scan chunks']:.2f}x")


if __name__ == "__main__":
    main()
