"""Value-fit throughput on math-shaped rows, side by side in one run: (a) ours on padded rows,
(b) ours on packed rows (``algorithm.pack_length``: rows end to end with segment ids, no padding),
(c) a Hugging Face PyTorch training loop of the same model on the same padded rows.

The rows look like a math collection's: a ~128-token prompt and a long-tailed response (lognormal,
median ~100 tokens, cut at 512), left padded to one width. The value model is Llama-shaped with the
real 128,256-token vocabulary at CPU-feasible depth and width (2 layers x 512 by default), a
categorical head of 11 atoms, AdamW on every parameter; the same initial weights in both frameworks.
Throughput counts useful tokens (real tokens, not padding) per second, compile time excluded.

Usage: python -m experiments.bench.pack_bench [--rows 64] [--batch 8] [--layers 2] [--width 512]
The last line: ``packed_vs_padded=… fit_speedup_vs_torch=…`` (ours packed over HF padded).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from qsharp_jax import objectives, packing, train
from qsharp_jax.models.build import clone
from qsharp_jax.models.value import HeadConfig, value_from_hf

VOCAB, ATOMS, PROMPT, LONGEST = 128_256, 11, 128, 512


def response_lengths(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` long-tailed response lengths like a math collection's: lognormal, median ~100, cut at 512."""
    return np.minimum(LONGEST, np.ceil(rng.lognormal(np.log(100), 0.9, n))).astype(int)


def llama_config(vocab: int, layers: int, width: int, kv_heads: int | None = None) -> transformers.LlamaConfig:
    """A Llama-family shape: 64-wide heads, an MLP 3x the width, tied embeddings (the LM head is
    the embedding: at a 128k vocabulary it is most of a small model's weights)."""
    heads = width // 64
    return transformers.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=3 * width,
                                    num_hidden_layers=layers, num_attention_heads=heads,
                                    num_key_value_heads=min(kv_heads or heads, heads), max_position_embeddings=2048,
                                    tie_word_embeddings=True)


def rows(n: int, seed: int = 0, vocab: int = VOCAB, samples: int = 1) -> dict[str, np.ndarray]:
    """``n`` rows of prompt + long-tailed response, left padded; binary rewards. ``samples``: rows
    come in groups of that many answers to one prompt (their ``group``: row // samples)."""
    rng = np.random.default_rng(seed)
    responses = response_lengths(n, rng)
    width = PROMPT + responses.max()
    lengths = PROMPT + responses
    at = np.arange(width)
    mask = at[None] >= (width - lengths)[:, None]
    loss_mask = at[None] >= (width - responses)[:, None]
    tokens = rng.integers(0, vocab, (n, width)).astype(np.int32)
    group = np.arange(n) // samples
    prompts = rng.integers(0, vocab, (group[-1] + 1, PROMPT))
    for r in range(n):
        tokens[r, width - lengths[r]: width - responses[r]] = prompts[group[r]]
    return {"tokens": tokens, "attention_mask": mask, "loss_mask": loss_mask,
            "rewards": rng.integers(0, 2, n).astype(np.float32), "group": group}


def pack(data: dict[str, np.ndarray], share: bool = False) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``data``'s rows packed end to end into sequences of its padded width: what a train step reads
    and each packed token's row (-1: padding); ``share``: a group's answers share its prompt's tokens."""
    packed = packing.pack_rows(data, data["tokens"].shape[1], data["group"] if share else None)
    return {k: packed[k] for k in (packing.SHARED_BATCH_KEYS if share else packing.BATCH_KEYS)}, packed["rows"]


def build(layers: int, width: int, tmp: Path, vocab: int = VOCAB):
    """The value model in both frameworks, with the same weights (ours loaded from the HF checkpoint)."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(llama_config(vocab, layers, width)).save_pretrained(tmp)
    ours = value_from_hf(tmp, HeadConfig("categorical", ATOMS), seed=0)
    backbone = transformers.LlamaModel.from_pretrained(tmp)
    head = torch.nn.Linear(width, ATOMS)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.asarray(ours.head.kernel[...]).copy()))  # both [out, in]
        head.bias.copy_(torch.from_numpy(np.asarray(ours.head.bias[...]).copy()))
    return ours, backbone, head


def ours(model, data: dict[str, np.ndarray], batch: int, optimizer) -> tuple[float, float]:
    """Seconds for one pass of ``batch``-row steps over ``data`` (after a compiling pass), and the last loss."""
    epoch = train.make_train_epoch(objectives.value_loss, optimizer)
    steps = len(data["tokens"]) // batch
    chunk = {k: jnp.asarray(v[: steps * batch].reshape(steps, batch, *v.shape[1:])) for k, v in data.items()}
    state = train.init_state(clone(model), optimizer, jax.random.key(0))  # the epoch consumes its state
    state, metrics = epoch(state, chunk)  # compiles
    jax.block_until_ready(metrics["loss"])
    start = time.perf_counter()
    state, metrics = epoch(state, chunk)
    loss = float(metrics["loss"][-1])
    return time.perf_counter() - start, loss


def torch_loss(backbone, head, batch: dict[str, np.ndarray]) -> torch.Tensor:
    """Our categorical value loss in PyTorch for 0/1 rewards (atoms 0..1: the target is the end atom,
    so the projected cross-entropy is plain cross-entropy), over the fitted tokens of the batch."""
    tokens, mask = torch.from_numpy(batch["tokens"]).long(), torch.from_numpy(batch["attention_mask"])
    fitted = torch.from_numpy(batch["loss_mask"] & batch["attention_mask"])
    target = (torch.from_numpy(batch["rewards"]).long() * (ATOMS - 1))[:, None].expand(-1, tokens.shape[1])
    positions = (mask.long().cumsum(1) - 1).clamp(min=0)
    hidden = backbone(tokens, attention_mask=mask.long(), position_ids=positions).last_hidden_state
    return torch.nn.functional.cross_entropy(head(hidden)[fitted], target[fitted])


def torch_loop(backbone, head, data: dict[str, np.ndarray], batch: int) -> tuple[float, float]:
    """The same padded steps in a PyTorch training loop (AdamW over every parameter)."""
    params = [*backbone.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    steps = len(data["tokens"]) // batch

    def step(i):
        loss = torch_loss(backbone, head, {k: v[i * batch: (i + 1) * batch] for k, v in data.items()})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss.item()

    step(0)  # warm-up
    start = time.perf_counter()
    for i in range(steps):
        loss = step(i)
    return time.perf_counter() - start, loss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8, help="rows per padded step (packed: sequences per step)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = rows(args.rows)
    width = data["tokens"].shape[1]
    packed, _ = pack(data)
    useful = int(data["attention_mask"].sum())
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); value model Llama {args.layers} x {args.width}, vocabulary {VOCAB}")
    print(f"{args.rows} rows of width {width}: {useful} real tokens ({useful / data['tokens'].size:.0%} of the padded "
          f"batch), packed into {len(packed['tokens'])} sequences ({useful / packed['tokens'].size:.0%} real)")
    results = compare(data, args.layers, args.width, args.batch)
    print(f"packed_vs_padded={results['ours packed'] / results['ours padded']:.2f} "
          f"fit_speedup_vs_torch={results['ours packed'] / results['HF PyTorch padded']:.2f}")


def compare(data: dict, layers: int, width: int, batch: int, shared: bool = False) -> dict[str, float]:
    """Useful tokens/s of one pass over ``data``: ours padded, ours packed (and with ``shared``, packed
    with each group's prompt encoded once), HF padded. Useful tokens: the real tokens of the rows a
    pass covers (a shared prompt counts once per row, as the padded rows hold it)."""
    optimizer = train.make_optimizer(train.OptimizerConfig(learning_rate=1e-4, weight_decay=0.0))
    padded = {k: v for k, v in data.items() if k != "group"}
    lengths = padded["attention_mask"].sum(1)
    ways = {"ours padded": (padded, np.arange(len(lengths))[:, None]), "ours packed": pack(data)}
    if shared:
        ways["ours packed, shared prompts"] = pack(data, share=True)
    ways["HF PyTorch padded"] = ways["ours padded"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model, backbone, head = build(layers, width, Path(tmp))
        # packed steps hold as many tokens as padded ones: the same batch of sequences per step
        for name, (steps_data, rows_of) in ways.items():
            if name.startswith("HF"):
                seconds, _ = torch_loop(backbone, head, padded, batch)
            else:
                seconds, _ = ours(model, steps_data, batch, optimizer)
            steps = len(steps_data["tokens"]) // batch
            covered = np.unique(rows_of[: steps * batch])
            tokens = int(lengths[covered[covered >= 0]].sum())
            results[name] = tokens / seconds
            print(f"  {name:28s} {steps:4d} steps {seconds:7.2f} s {tokens / seconds:9.0f} useful tokens/s", flush=True)
    return results


if __name__ == "__main__":
    main()
