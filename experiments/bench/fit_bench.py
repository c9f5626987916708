"""Value-fit throughput, side by side in one run, three ways over the same batches from the same
state (so their results agree): (a) one jitted step per batch from a Python loop, each batch copied
from the host; (b) ``train.make_train_epoch`` — what ``train.fit`` and so the Algorithm 1 driver
use — a device-resident chunk of batches, one jitted step per batch reading from it; (c) the same
chunk in one jitted ``lax.scan`` over the steps.

Usage: python -m experiments.bench.fit_bench [--steps 1000] [--batch 32] [--chunk 200]
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
        raw_step = train._step_fn(loss_fn, optimizer)
        scan = jax.jit(lambda state, chunk: jax.lax.scan(raw_step, state, chunk), donate_argnums=0)
        batches = [{k: v[i * args.batch : (i + 1) * args.batch] for k, v in examples.items()} for i in range(args.steps)]

        def loop(state):
            for batch in batches:
                state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
            return state, metrics["loss"]

        def chunked(run_chunk):
            def fit(state):
                for start in range(0, args.steps, args.chunk):
                    chunk = {k: jnp.asarray(v[start * args.batch : (start + args.chunk) * args.batch].reshape(
                        -1, args.batch, *v.shape[1:])) for k, v in examples.items()}
                    state, metrics = run_chunk(state, chunk)
                return state, metrics["loss"][-1]
            return fit

        seconds = {}
        ways = (("python loop of jitted steps", loop), ("make_train_epoch (train.fit)", chunked(epoch)),
                ("one lax.scan per chunk", chunked(scan)))
        for label, fit in ways:
            fit(fresh())  # compile
            start = time.perf_counter()
            _, loss = fit(fresh())
            jax.block_until_ready(loss)
            seconds[label] = time.perf_counter() - start
            print(f"  {name:10s} {label:30s} {args.steps / seconds[label]:8.0f} steps/s  (last loss {float(loss):.4f})")
        base = seconds["python loop of jitted steps"]
        print(f"  {name:10s} vs the python loop: make_train_epoch {base / seconds[ways[1][0]]:.2f}x, "
              f"lax.scan {base / seconds[ways[2][0]]:.2f}x")


if __name__ == "__main__":
    main()
