"""Collection and fitting throughput on a math-shaped workload, side by side in one run.

A Llama-family pair with the real 128,256-token vocabulary at CPU-feasible depth and width
(π_ref 4 × 1024, value model 2 × 512, tied embeddings, random weights: the same in both
frameworks), prompts of 128 tokens, 8 samples per prompt, response lengths drawn long-tailed
(lognormal, median ~100, cut at 512: a row stops at its drawn length, since random weights do not
emit EOS like a math model; both frameworks stop each row at the same length), Q♯ guidance by the
V-type value model over π_ref's top-20, η = 0.1, top-k 20 sampling. Collection, useful (generated)
tokens per second:

  (a) ours, static loop: batches of ``--slots`` rows, each until its longest row ends, each
      prompt prefilled once for its 8 samples (``samples_per_prompt``);
  (b) ours, continuous batching (``slots``, refills of one prompt's 8 samples);
  (c) ours, continuous, plain π_ref (for guided_vs_plain);
  (d) HF PyTorch ``generate`` in batches of ``--slots`` rows with the Q♯ LogitsProcessor that
      does what the official code does (rollout_bench.TorchQSharpProcessor), rows stopped at their
      lengths by a StoppingCriteria.

The prefill alone (every row stopped after one token), static loop, with and without shared
prompts, shows what ``samples_per_prompt`` saves; the first static batch decoded again with
attention over the whole preallocated cache (``transformer.CACHE_BLOCK`` beyond its length) shows
what reading only the filled blocks saves, and (b) again over every slot of its ring caches what
reading back only to the longest live row saves there. Then value fitting on rows of the same shape
(64 rows, 8 answers per prompt; pack_bench.compare: ours padded, packed, packed with shared
prompts, an HF PyTorch loop). Compile time is excluded (ours compile on a run of 1-token rows).

Usage: python -m experiments.bench.math_bench [--prompts 4] [--slots 16]
The last line: ``math_collect_speedup_vs_torch=… continuous_vs_static=… fit_speedup_vs_torch=… guided_vs_plain=…``
((b) over (d), (b) over (a), our best fit over HF's, (b) over (c)).
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

from experiments.bench import pack_bench
from experiments.bench.rollout_bench import TorchQSharpProcessor
from qsharp_jax.models import from_hf, transformer
from qsharp_jax.models.value import HeadConfig, value_from_hf
from qsharp_jax.rollout import generate

VOCAB, PROMPT, LONGEST, SAMPLES, TOP_K, ETA, ATOMS = 128_256, 128, 512, 8, 20, 0.1, 11


def build(tmp: Path, vocab: int = VOCAB, ref_shape=(4, 1024), value_shape=(2, 512)):
    """π_ref and the value model in both frameworks, with the same random weights."""
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(pack_bench.llama_config(vocab, *ref_shape, kv_heads=4)).save_pretrained(tmp / "ref")
    transformers.LlamaForCausalLM(pack_bench.llama_config(vocab, *value_shape, kv_heads=2)).save_pretrained(tmp / "value")
    ref_t = transformers.LlamaForCausalLM.from_pretrained(tmp / "ref").eval()
    value_j = value_from_hf(tmp / "value", HeadConfig("categorical", ATOMS), seed=0)
    backbone_t = transformers.LlamaModel.from_pretrained(tmp / "value").eval()
    head_t = torch.nn.Linear(value_shape[1], ATOMS)
    with torch.no_grad():
        head_t.weight.copy_(torch.from_numpy(np.asarray(value_j.head.kernel[...]).copy()))  # both [out, in]
        head_t.bias.copy_(torch.from_numpy(np.asarray(value_j.head.bias[...]).copy()))
    return from_hf(tmp / "ref"), value_j, ref_t, backbone_t, head_t


def workload(prompts: int, vocab: int = VOCAB, seed: int = 0):
    """Prompts repeated for their samples (row r: prompt r // 8) ``[R, 128]`` and each row's length ``[R]``."""
    rng = np.random.default_rng(seed)
    ids = np.repeat(rng.integers(1, vocab, (prompts, PROMPT)), SAMPLES, axis=0).astype(np.int32)
    return ids, pack_bench.response_lengths(len(ids), rng)


def schedule_steps(lengths: np.ndarray, slots: int, refill: int, spans: list | None = None) -> int:
    """Decoding steps of the continuous loop's schedule over rows of these lengths (the same refill
    rule as ``rollout``: the next ``refill`` queued rows start once that many slots are free).
    ``spans``: each step's longest live row (prompt and tokens so far, this one too) is appended."""
    t, row = np.zeros(slots, int), np.arange(slots)
    free, head, steps = np.arange(slots) >= len(lengths), min(slots, len(lengths)), 0
    while head < len(lengths) or not free.all():
        take = min(refill, len(lengths) - head)
        if take and free.sum() >= take:
            at = np.flatnonzero(free)[:take]
            row[at], t[at], free[at], head = head + np.arange(take), 0, False, head + take
        if spans is not None:
            spans.append(PROMPT + 1 + t[~free].max())
        t += ~free
        free |= t >= lengths[row]
        steps += 1
    return steps


def static_steps(lengths: np.ndarray, slots: int) -> int:
    return int(sum(lengths[i:i + slots].max() for i in range(0, len(lengths), slots)))


class Budget(transformers.StoppingCriteria):
    """Each row of an HF ``generate`` batch ends at its own length."""

    def __init__(self, lengths: np.ndarray):
        self.lengths = torch.from_numpy(lengths)

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full_like(self.lengths, input_ids.shape[1] - PROMPT) >= self.lengths


def ours(ref, value, ids, lengths, *, slots: int, continuous: bool, share: bool, guided: bool,
         prefill_only: bool = False):
    """Tokens and seconds of one collection over every row (after a compiling run of 1-token rows;
    ``prefill_only``: the time of that run's repeat, i.e. the prompts' prefill and one step)."""
    kwargs = dict(key=jax.random.key(0), max_new_tokens=LONGEST, top_k=TOP_K,
                  samples_per_prompt=SAMPLES if share else 1)
    if guided:
        kwargs.update(value_model=value, guidance="qsharp", eta=ETA)
    if continuous:
        kwargs.update(slots=slots, refill=SAMPLES)
        calls = [slice(0, len(ids))]  # one queue
    else:
        calls = [slice(i, i + slots) for i in range(0, len(ids), slots)]

    def run(budget):
        out = [generate(ref, ids[c], np.ones(ids[c].shape, bool), max_lengths=budget[c],
                        row_ids=np.arange(len(ids))[c], **kwargs) for c in calls]
        return [np.asarray(o.tokens) for o in out]

    run(np.ones_like(lengths))  # compiles the same programs
    start = time.perf_counter()
    tokens = run(np.ones_like(lengths) if prefill_only else lengths)
    return np.concatenate(tokens), time.perf_counter() - start


def hf(ref_t, backbone_t, head_t, ids, lengths, *, slots: int, guided: bool):
    """Seconds of HF ``generate`` over every row in batches of ``slots`` (after a short warm-up)."""
    def run(budget, rows):
        for start in range(0, rows, slots):
            batch = torch.from_numpy(ids[start:start + slots]).long()
            procs = [TorchQSharpProcessor(backbone_t, head_t, torch.linspace(0, 1, ATOMS), ETA, TOP_K)] if guided else []
            with torch.no_grad():
                ref_t.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True, top_k=TOP_K,
                               max_new_tokens=int(budget[start:start + slots].max()), pad_token_id=0,
                               eos_token_id=None, logits_processor=transformers.LogitsProcessorList(procs),
                               stopping_criteria=transformers.StoppingCriteriaList([Budget(budget[start:start + slots])]))

    run(np.full_like(lengths, 2), slots)  # warm-up
    start = time.perf_counter()
    run(lengths, len(ids))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, help="prompts; rows = 8 samples per prompt")
    parser.add_argument("--slots", type=int, default=16, help="rows decoded at once (static batches, HF batches)")
    parser.add_argument("--fit-rows", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    ids, lengths = workload(args.prompts)
    useful = int(lengths.sum())
    batches = [lengths[i:i + args.slots] for i in range(0, len(lengths), args.slots)]
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); π_ref Llama 4 x 1024, value 2 x 512, vocabulary {VOCAB}")
    print(f"{len(ids)} rows ({args.prompts} prompts x {SAMPLES} samples, prompt {PROMPT}): {useful} tokens to generate, "
          f"lengths median {int(np.median(lengths))}, max {lengths.max()}; static batches of {args.slots} decode "
          f"{sum(len(b) * b.max() for b in batches)} row-steps for them", flush=True)
    print(f"steps: static {static_steps(lengths, args.slots)}, continuous {schedule_steps(lengths, args.slots, SAMPLES)}"
          f" (at least {max(lengths.max(), -(-useful // args.slots))}); with 4x the prompts "
          + ", ".join(f"static / continuous at refills of {r}: "
                      f"{static_steps(more, args.slots) / schedule_steps(more, args.slots, r):.2f}"
                      for more in [workload(4 * args.prompts)[1]] for r in (SAMPLES, 1)), flush=True)
    results, tokens = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        ref, value, ref_t, backbone_t, head_t = build(Path(tmp))
        for share in (False, True):
            _, seconds = ours(ref, value, ids, lengths, slots=args.slots, continuous=False, share=share, guided=True,
                              prefill_only=True)
            print(f"  prefill + 1 token, static, {'shared prompts' if share else 'every row':14s} {seconds:8.2f} s",
                  flush=True)
        first = slice(0, args.slots)
        blocked = {}
        for name, block in (("filled blocks", transformer.CACHE_BLOCK), ("whole cache", 10**9)):
            default, transformer.CACHE_BLOCK = transformer.CACHE_BLOCK, block
            jax.clear_caches()  # the block size is read when the loop is traced
            _, seconds = ours(ref, value, ids[first], lengths[first], slots=args.slots, continuous=False, share=True,
                              guided=True)
            print(f"  first static batch, attention over {name:13s} {seconds:8.1f} s", flush=True)
            if block != default:  # the continuous loop's rings over every slot (the filled-block run is (b) below)
                _, blocked[name] = ours(ref, value, ids, lengths, slots=args.slots, share=True, continuous=True,
                                        guided=True)
            transformer.CACHE_BLOCK = default
            jax.clear_caches()
        ways = [("ours static", dict(continuous=False, guided=True)),
                ("ours continuous", dict(continuous=True, guided=True)),
                ("ours continuous, plain", dict(continuous=True, guided=False))]
        for name, way in ways:
            tokens[name], seconds = ours(ref, value, ids, lengths, slots=args.slots, share=True, **way)
            results[name] = useful / seconds
            print(f"  {name:30s} {seconds:8.1f} s {results[name]:8.1f} tokens/s", flush=True)
        seconds = hf(ref_t, backbone_t, head_t, ids, lengths, slots=args.slots, guided=True)
        results["HF generate + Q♯ processor"] = useful / seconds
        print(f"  {'HF generate + Q♯ processor':30s} {seconds:8.1f} s {results['HF generate + Q♯ processor']:8.1f} "
              "tokens/s", flush=True)
        del ref_t, backbone_t, head_t
    spans, ring = [], PROMPT + LONGEST
    schedule_steps(lengths, args.slots, SAMPLES, spans)
    read = np.minimum(-(-np.asarray(spans) // transformer.CACHE_BLOCK) * transformer.CACHE_BLOCK, ring)
    print(f"  continuous, attention over every ring slot   {blocked['whole cache']:8.1f} s "
          f"({useful / blocked['whole cache']:.1f} tokens/s; over the live rows' blocks: (b), which read "
          f"{read.mean() / ring:.0%} of the {ring} slots on average: the longest live row's span in whole blocks)")
    same = np.mean(np.all(tokens["ours static"] == tokens["ours continuous"], axis=1))
    print(f"rows the continuous loop drew exactly as the static one: {same:.0%}")
    fit_data = pack_bench.rows(args.fit_rows, samples=SAMPLES)
    print(f"fit: {args.fit_rows} rows ({SAMPLES} answers per prompt) of width {fit_data['tokens'].shape[1]}, "
          "value model 2 x 512", flush=True)
    fit = pack_bench.compare(fit_data, 2, 512, 8, shared=True)
    best = max(v for k, v in fit.items() if k.startswith("ours"))
    print("\n| way | useful tokens/s |\n|---|---|")
    for name, rate in {**results, **{f"fit: {k}": v for k, v in fit.items()}}.items():
        print(f"| {name} | {rate:.1f} |")
    print(f"\nmath_collect_speedup_vs_torch={results['ours continuous'] / results['HF generate + Q♯ processor']:.2f} "
          f"continuous_vs_static={results['ours continuous'] / results['ours static']:.2f} "
          f"fit_speedup_vs_torch={best / fit['HF PyTorch padded']:.2f} "
          f"guided_vs_plain={results['ours continuous'] / results['ours continuous, plain']:.2f}")


if __name__ == "__main__":
    main()
