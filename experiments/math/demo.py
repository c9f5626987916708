"""The paper's math picture on a CPU: π_ref trained from scratch on carry-forgetting solutions of
addition word problems (:mod:`experiments.math.arithmetic`), a value model fitted by Algorithm 1,
then π_ref, CD and Q♯ evaluated like Table 1 (pass@1, maj1@8, KL) and over a small η sweep.

``python -m experiments.math CONFIG [key=value ...]`` (``make math-demo`` runs demo.yaml) writes
into ``run_dir``: ``results.json`` (``{"eta", "methods": {"pretrained"|"cd"|"qsharp": {"pass@1",
"maj1@8", "kl", ...}}, "sweep": [{"eta", "method", "pass@1", "kl"}, ...]}``), ``results.md``
(the table, accuracy by number of carries, the sweep), ``kl_sweep.png`` (accuracy against KL for
both methods over η), ``samples.jsonl``; ``reference/`` (π_ref's checkpoint), ``qsharp/`` (the
Algorithm 1 run directory), ``tokenizer/``.

The library does the work — the math task (:class:`~qsharp_jax.tasks.math_task.MathTask`, answers
checked by math-verify in worker processes), SFT, Algorithm 1, ``eval-math``'s evaluation; this
module only generates the data and configures them. CD is the same value model's mean-return
offset E[R]/η (as in the star-graph comparison), so the two differ in their guidance only.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments.math import arithmetic
from qsharp_jax import algorithm, eval_math
from qsharp_jax import config as config_lib
from qsharp_jax.models.build import ModelSpec, build_reference
from qsharp_jax.models.value import HeadConfig, value_from_reference
from qsharp_jax.sft import SFTConfig, train_sft
from qsharp_jax.tasks.math_data import encode_prompts
from qsharp_jax.tasks.math_task import MathTask
from qsharp_jax.train import OptimizerConfig


@dataclasses.dataclass(frozen=True)
class DemoEvalConfig:
    """The evaluation.

    Fields:
      samples: per test problem (maj1@samples), at the run's η.
      sweep: more η for the accuracy-against-KL curve of CD and Q♯ ...
      sweep_samples: ... with this many samples per problem.
      batch: rows per decoding call.
    """

    samples: int = 8
    sweep: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
    sweep_samples: int = 2
    batch: int = 1024


@dataclasses.dataclass(frozen=True)
class MathDemoConfig:
    """The CPU math experiment.

    Fields:
      run_dir: where everything goes (a run there is resumed: π_ref and Algorithm 1 from their
        checkpoints).
      seed: of the problems, π_ref's data, every model and every draw.
      problems: the problems and π_ref's carry noise.
      sft_problems: problems whose noisy solutions π_ref is trained on.
      train_problems: Algorithm 1's prompts (other problems).
      test_problems: the evaluation problems (others again).
      reference: π_ref's architecture (vocab_size >= the task tokenizer's 71 tokens).
      sft: π_ref's next-token training.
      head: the value head (its backbone starts as a copy of π_ref).
      algorithm: Algorithm 1 (η, top-k, decoding, the value fit).
      evaluation: how π_ref, CD and Q♯ are compared.
    """

    run_dir: str = "runs/math_demo"
    seed: int = 0
    problems: arithmetic.ProblemConfig = arithmetic.ProblemConfig()
    sft_problems: int = 20_000
    train_problems: int = 4_000
    test_problems: int = 400
    reference: ModelSpec = ModelSpec(vocab_size=80, hidden_size=64, num_layers=3, num_heads=4, mlp_dim=256,
                                     max_positions=96)
    sft: SFTConfig = SFTConfig(epochs=3, batch_size=64, optimizer=OptimizerConfig(
        learning_rate=3e-3, weight_decay=0.0, warmup_steps=50, decay_steps=887, schedule="cosine"))
    head: HeadConfig = HeadConfig("categorical", 11)
    algorithm: algorithm.AlgorithmConfig = algorithm.AlgorithmConfig(
        iterations=3, prompts_per_iteration=512, samples_per_prompt=4, max_new_tokens=64, eta=0.1, top_k=4,
        epochs=8, batch_size=64, rollout_batch=1024, optimizer=OptimizerConfig(learning_rate=1e-3,
                                                                                weight_decay=0.0))
    evaluation: DemoEvalConfig = DemoEvalConfig()


def _split(cfg: MathDemoConfig):
    """Disjoint problem sets (no problem text in two of them): SFT, Algorithm 1, test."""
    rng = np.random.default_rng([cfg.seed, 0])
    sizes = (cfg.sft_problems, cfg.train_problems, cfg.test_problems)
    pool, seen = [], set()
    while len(pool) < sum(sizes):
        for p in arithmetic.make_problems(cfg.problems, sum(sizes) - len(pool), rng):
            if p.problem not in seen:
                seen.add(p.problem)
                pool.append(p)
    return pool[: sizes[0]], pool[sizes[0]: sizes[0] + sizes[1]], pool[sizes[0] + sizes[1]:]


def _reference(cfg: MathDemoConfig, tokenizer, problems, progress: bool):
    """π_ref: next-token training on the noisy solutions (its checkpoint restored on a rerun)."""
    rng = np.random.default_rng([cfg.seed, 1])
    ids, mask, kept = encode_prompts(tokenizer, problems, 64, tokenizer.pad_token_id, too_long="error")
    texts = [arithmetic.solution(*arithmetic.numbers(p), rng, cfg.problems) for p in problems]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = max(map(len, encoded))
    responses = np.full((len(encoded), width), tokenizer.pad_token_id, np.int32)
    response_mask = np.zeros((len(encoded), width), bool)
    for row, e in enumerate(encoded):
        responses[row, : len(e)], response_mask[row, : len(e)] = e, True
    meta = {"reference": dataclasses.asdict(cfg.reference), "problems": dataclasses.asdict(cfg.problems),
            "sft_problems": cfg.sft_problems}
    return train_sft(cfg.sft, build_reference(cfg.reference), ids, mask, responses, response_mask, seed=cfg.seed,
                     directory=Path(cfg.run_dir) / "reference", meta=meta, desc="pretrain π_ref", progress=progress)


def run(cfg: MathDemoConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train π_ref, run Algorithm 1, evaluate π_ref / CD / Q♯; returns ``results.json``'s content."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    tokenizer = arithmetic.make_tokenizer()
    tokenizer.save_pretrained(run_dir / "tokenizer")
    if cfg.reference.vocab_size < len(tokenizer):
        raise ValueError(f"reference.vocab_size={cfg.reference.vocab_size} is below the tokenizer's {len(tokenizer)} "
                         "tokens")
    sft_set, train_set, test_set = _split(cfg)
    task = MathTask(tokenizer, train_set, test_set, max_prompt_len=64, workers=1)
    try:
        ref = _reference(cfg, tokenizer, sft_set, progress)
        seconds = {"pretrain": round(time.time() - started, 1)}
        value = value_from_reference(ref, cfg.head, seed=cfg.seed + 1)
        algorithm.run(cfg.algorithm, task, ref, value, run_dir / "qsharp", progress=progress)
        state, _ = algorithm.latest_state(cfg.algorithm, value, run_dir / "qsharp")
        seconds["algorithm_1"] = round(time.time() - started - seconds["pretrain"], 1)
        algo, ev = cfg.algorithm, cfg.evaluation
        settings = dict(max_new_tokens=algo.max_new_tokens, top_k=algo.top_k, temperature=algo.temperature,
                        top_p=algo.top_p, eos_id=task.eos_id, pad_id=task.pad_id)
        sampling = eval_math.Sampling(samples=ev.samples, settings=settings, batch=ev.batch, seed=cfg.seed)
        ids, mask = task.eval_prompts()
        results, samples = eval_math.evaluate_methods(
            task, ref, state.model(), task.evaluation, ids, mask, sampling, methods=("pretrained", "cd", "qsharp"),
            eta=algo.eta, sweep=ev.sweep, sweep_sampling=dataclasses.replace(sampling, samples=ev.sweep_samples),
            progress=progress)
        seconds["evaluation"] = round(time.time() - started - sum(seconds.values()), 1)
    finally:
        task.close()
    results = {"eta": algo.eta, **results, "problems": len(task.evaluation), "samples": ev.samples,
               "test_file": "generated addition problems", "temperature": algo.temperature, "top_p": algo.top_p,
               "seed": cfg.seed, "level_name": "carries", "seconds": seconds, "config": config_lib.as_json(cfg)}
    eval_math.write(run_dir, results, samples, task.evaluation, name="results")
    return results


def print_summary(results: dict[str, Any], run_dir: str) -> None:
    print((Path(run_dir) / "results.md").read_text(), end="")
    print(f"written: {run_dir}/results.json, results.md, kl_sweep.png, samples.jsonl ({results['seconds']} s)")
