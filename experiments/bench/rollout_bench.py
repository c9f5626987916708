"""Rollout throughput, side by side in one run: our jitted decode vs Hugging Face PyTorch `generate`.

(a) ours, plain π_ref          (b) ours, Q♯-guided (V-type value model scores π_ref's top-k)
(c) HF generate, plain         (d) HF generate + a LogitsProcessor doing what the official Q♯ code
                                   does: it keeps the value model's KV cache across steps and scores
                                   π_ref's top-k candidates in one forward with a diagonal mask.

Two model pairs with random weights (same weights in both frameworks): a tiny pair (overhead-bound)
and a GPT-2-small-shaped pair (reference 124M with the real 50257-token vocabulary, value ~30M).
Also measures the machine's peak matmul FLOP/s and the fraction of it our decode reaches.

Usage: python experiments/bench/rollout_bench.py [--batches 8 32] [--new-tokens 128] [--sizes tiny small]
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from qsharp_jax.models import from_hf
from qsharp_jax.models.value import HeadConfig, value_from_hf
from qsharp_jax.rollout import generate

PROMPT_LEN, TOP_K, ETA, NUM_ATOMS = 32, 20, 0.1, 11


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    vocab: int
    ref: tuple[int, int, int]  # layers, width, heads
    value: tuple[int, int, int]


SIZES = {
    "tiny": Size("tiny", 512, (2, 64, 4), (2, 64, 4)),
    "small": Size("small", 50257, (12, 768, 12), (6, 384, 6)),
}


def gpt2_config(vocab: int, shape: tuple[int, int, int]) -> transformers.GPT2Config:
    layers, width, heads = shape
    return transformers.GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=heads, n_positions=1024,
                                   bos_token_id=0, eos_token_id=0)


def build(size: Size, tmp: Path):
    """Same random weights in both frameworks."""
    torch.manual_seed(0)
    ref_t = transformers.GPT2LMHeadModel(gpt2_config(size.vocab, size.ref)).eval()
    value_lm = transformers.GPT2LMHeadModel(gpt2_config(size.vocab, size.value)).eval()
    ref_t.save_pretrained(tmp / "ref")
    value_lm.save_pretrained(tmp / "value")
    ref_j = from_hf(tmp / "ref")
    value_j = value_from_hf(tmp / "value", HeadConfig("categorical", NUM_ATOMS), seed=0)
    head = torch.nn.Linear(size.value[1], NUM_ATOMS)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(np.asarray(value_j.head.kernel[...]).copy()))  # both [out, in]
        head.bias.copy_(torch.from_numpy(np.asarray(value_j.head.bias[...]).copy()))
    return ref_t, value_lm.transformer, head, ref_j, value_j


class TorchQSharpProcessor(transformers.LogitsProcessor):
    """Value guidance inside HF generate, as the official code does it (V-type, top-k candidates)."""

    def __init__(self, backbone, head, atoms: torch.Tensor, eta: float, top_k: int):
        self.backbone, self.head, self.atoms, self.eta, self.top_k = backbone, head, atoms, eta, top_k
        self.cache, self.length = None, 0

    @torch.no_grad()
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        b, length = input_ids.shape
        if self.cache is None:  # prefill the value model on the prompt
            out = self.backbone(input_ids, use_cache=True)
        else:  # advance its cache by the token just sampled
            out = self.backbone(input_ids[:, -1:], cache=self.cache, use_cache=True,
                                position_ids=torch.full((b, 1), length - 1))
        self.cache, k = out.past_key_values, self.top_k
        top = scores.topk(k, dim=-1).indices
        allowed = torch.cat([torch.ones(b, k, length, dtype=torch.bool),
                             torch.eye(k, dtype=torch.bool).expand(b, k, k)], dim=-1)
        mask = torch.where(allowed, 0.0, torch.finfo(torch.float32).min)[:, None]
        hidden = self.backbone(top, attention_mask=mask, position_ids=torch.full((b, k), length), cache=self.cache,
                               use_cache=True, cache_position=torch.arange(length, length + k)).last_hidden_state
        self.cache.crop(-k)  # drop the candidates again
        log_p = torch.log_softmax(self.head(hidden), dim=-1)
        offsets = torch.logsumexp(log_p + self.atoms / self.eta, dim=-1)  # [b, k]
        guided = scores + offsets.min(dim=-1, keepdim=True).values
        return guided.scatter(1, top, scores.gather(1, top) + offsets)


def timed(fn, repeats: int = 1) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def peak_matmul_flops() -> float:
    """Best of JAX and torch float32 2048² matmuls: what this machine's matmul units deliver."""
    n = 2048
    a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    t_jax = timed(lambda: mm(a).block_until_ready(), 5)
    at = torch.randn(n, n)
    t_torch = timed(lambda: at @ at, 5)
    return 2 * n**3 / min(t_jax, t_torch)


def decode_flops(size: Size, batch: int, new: int, guided: bool) -> float:
    """Matmul FLOPs of prefill + decode, counted from the model shapes.

    Guided: the value model prefills the prompt and scores k candidates per step; the chosen
    candidate's keys/values are reused, so no extra one-token value forward is counted (the HF
    processor does run one, so its GFLOP/s are slightly understated).
    """

    def per_token(shape, ctx, lm_head):
        layers, e, _ = shape
        dense = layers * 12 * e * e  # qkv + out (4e²) + mlp (8e²)
        attn = layers * 2 * e * ctx  # scores + weighted sum
        return 2 * (dense + (size.vocab * e if lm_head else 0)) + 2 * attn

    total = 0.0
    for t in range(PROMPT_LEN + new):
        total += per_token(size.ref, t + 1, lm_head=t >= PROMPT_LEN - 1)
        if guided and t < PROMPT_LEN:
            total += per_token(size.value, t + 1, lm_head=False)
        if guided and t >= PROMPT_LEN - 1:
            total += TOP_K * per_token(size.value, t + 2, lm_head=False)
    return batch * total


def run(size: Size, batch: int, new: int, models, rows: list[dict]) -> None:
    ref_t, backbone_t, head_t, ref_j, value_j = models
    rng = np.random.default_rng(batch)
    prompt = rng.integers(1, size.vocab, size=(batch, PROMPT_LEN))
    ids_j, mask_j = jnp.asarray(prompt, jnp.int32), jnp.ones(prompt.shape, bool)
    ids_t = torch.from_numpy(prompt)

    def ours(guided: bool):
        kwargs = dict(value_model=value_j, guidance="qsharp", eta=ETA) if guided else {}
        return lambda: generate(ref_j, ids_j, mask_j, key=jax.random.key(0), max_new_tokens=new, top_k=TOP_K,
                                **kwargs).tokens.block_until_ready()

    def hf(guided: bool, tokens: int):
        def call():
            procs = [TorchQSharpProcessor(backbone_t, head_t, torch.linspace(0, 1, NUM_ATOMS), ETA, TOP_K)] if guided else []
            with torch.no_grad():
                ref_t.generate(ids_t, attention_mask=torch.ones_like(ids_t), do_sample=True, top_k=TOP_K,
                               max_new_tokens=tokens, min_new_tokens=tokens, pad_token_id=0,
                               logits_processor=transformers.LogitsProcessorList(procs))
        return call

    for method, guided in (("ours plain", False), ("ours Q♯", True)):
        fn = ours(guided)
        first = timed(fn)
        run_time = timed(fn)
        flops = decode_flops(size, batch, new, guided)
        rows.append(dict(size=size.name, batch=batch, method=method, seconds=run_time, compile=first - run_time,
                         tok_s=batch * new / run_time, gflops=flops / run_time / 1e9))
    for method, guided in (("HF plain", False), ("HF Q♯ processor", True)):
        hf(guided, 2)()  # warm-up
        run_time = timed(hf(guided, new))
        rows.append(dict(size=size.name, batch=batch, method=method, seconds=run_time, compile=0.0,
                         tok_s=batch * new / run_time, gflops=decode_flops(size, batch, new, guided) / run_time / 1e9))
    print_rows(rows[-4:])


def kv_bytes_per_sequence(size: Size, new: int) -> int:
    slots = PROMPT_LEN + new
    return sum(2 * layers * slots * e * 4 for layers, e, _ in (size.ref, size.value))


def print_rows(rows):
    for r in rows:
        print(f"{r['size']:>5} {r['batch']:>5} {r['method']:<16} {r['seconds']:>8.2f}s {r['tok_s']:>9.1f} tok/s "
              f"{r['gflops']:>7.1f} GFLOP/s  compile {r['compile']:>5.1f}s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small"], choices=sorted(SIZES))
    parser.add_argument("--batches", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); prompt {PROMPT_LEN}, top-k {TOP_K}, {args.new_tokens} new tokens")
    peak = peak_matmul_flops()
    print(f"peak float32 matmul: {peak / 1e9:.1f} GFLOP/s", flush=True)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.sizes:
            size = SIZES[name]
            models = build(size, Path(tmp) / name)
            print(f"{name}: reference {sum(p.numel() for p in models[0].parameters()) / 1e6:.1f}M params, value "
                  f"{sum(p.numel() for p in models[1].parameters()) / 1e6:.1f}M; KV cache per sequence "
                  f"{kv_bytes_per_sequence(size, args.new_tokens) / 2**20:.2f} MiB (ours, float32)", flush=True)
            for batch in args.batches:
                run(size, batch, args.new_tokens, models, rows)

    def pick(size, method, batch):
        return next(r for r in rows if r["size"] == size and r["method"] == method and r["batch"] == batch)

    print("\n| size | batch | method | tokens/s | GFLOP/s | share of peak | compile (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['batch']} | {r['method']} | {r['tok_s']:.1f} | {r['gflops']:.1f} | "
              f"{r['gflops'] * 1e9 / peak:.2f} | {r['compile']:.1f} |")
    batch = max(args.batches)
    summary = []
    for name in args.sizes:
        speedup = pick(name, "ours Q♯", batch)["tok_s"] / pick(name, "HF Q♯ processor", batch)["tok_s"]
        summary.append(f"guided_speedup_vs_torch_{name}={speedup:.2f}")
    if "small" in args.sizes:
        summary.append(f"flops_utilization_small={pick('small', 'ours plain', batch)['gflops'] * 1e9 / peak:.2f}")
    print(f"\n(ratios at batch {batch})")
    print(" ".join(summary))


if __name__ == "__main__":
    main()
