"""The paper's math picture on a CPU: π_ref trained from scratch on carry-forgetting solutions of
addition word problems (:mod:`experiments.math.arithmetic`), a value model fitted by Algorithm 1,
then π_ref, CD and Q♯ evaluated like Table 1 (pass@1, maj1@8, KL) and over a small η sweep.

``python -m experiments.math CONFIG [key=value ...]`` (``make math-demo`` runs demo.yaml) writes
into ``run_dir``: ``results.json`` (``{"eta", "methods": {"pretrained"|"cd"|"qsharp": {"pass@1",
"maj1@8", "kl", ...}}, "sweep": [{"eta", "method", "pass@1", "kl"}, ...], "carry_decisions":
[...]}``), ``results.md`` (the table, accuracy by number of carries, the sweep, the choices at
the carries: :func:`carry_decisions`), ``kl_sweep.png`` (accuracy against KL for
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
from qsharp_jax.tasks.math_data import chat_prompt, encode_prompts, left_pad
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
      head: the value head (its backbone starts as a copy of π_ref). Q-type: at "… + 8 =" π_ref's
        last hidden state already tells the carried tens digit from the forgotten one, and a Q-type
        head reads every candidate's value off it; a V-type head has to re-derive the sum after the
        digit is appended, and its values stayed too flat for Q♯ to beat CD here.
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
    head: HeadConfig = HeadConfig("categorical", 11, q_type=True)
    algorithm: algorithm.AlgorithmConfig = algorithm.AlgorithmConfig(
        iterations=3, prompts_per_iteration=512, samples_per_prompt=4, max_new_tokens=64, eta=0.1, top_k=4,
        epochs=6, batch_size=64, rollout_batch=1024, optimizer=OptimizerConfig(learning_rate=1e-3,
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
    meta = {"reference": cfg.reference, "problems": cfg.problems, "sft_problems": cfg.sft_problems}
    return train_sft(cfg.sft, build_reference(cfg.reference), ids, mask, responses, response_mask, seed=cfg.seed,
                     directory=Path(cfg.run_dir) / "reference", meta=meta, desc="pretrain π_ref", progress=progress)


def carry_decisions(cfg: MathDemoConfig, tokenizer, problems, ref, value) -> list[dict[str, Any]]:
    """Where the outcome is decided: at every carry of the right solutions of ``problems``, how
    often π_ref, CD and Q♯ (at the run's η) write the carried tens digit rather than the forgotten
    one (their probabilities of the two, renormalized), and the value model's E[R] after each;
    one row per number of carries still ahead. Exactly, E[R] is 0 after a forgotten carry and
    p^ahead after a kept one (p: the carry rate of π_ref's data), so Q♯'s choice stays right
    however many carries lie ahead while CD's offset difference shrinks with E[R]."""
    import jax
    import jax.numpy as jnp

    from qsharp_jax import guidance

    if cfg.head.kind != "categorical":
        raise ValueError(f"carry_decisions compares CD and Q♯: a categorical head, not {cfg.head.kind!r}")
    rows = []  # (prefix ids, carried id, forgotten id, carries ahead)
    for p in problems:
        prompt = tokenizer(chat_prompt(tokenizer, p.problem), add_special_tokens=False)["input_ids"]
        for text, kept, lost, ahead in arithmetic.carry_points(*arithmetic.numbers(p)):
            ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (text, kept, lost)]
            rows.append((prompt + ids[0], ids[1][0], ids[2][0], ahead))
    pad = tokenizer.pad_token_id
    ids, mask = left_pad([r[0] for r in rows], pad)
    pair = np.array([r[1:3] for r in rows])  # [n, 2]: carried, forgotten
    ahead = np.array([r[3] for r in rows])
    def last(model, head, ids, mask):  # the head at the last position only (not [n, T, V, K])
        return np.asarray(head(model.hidden(jnp.asarray(ids), jnp.asarray(mask))[:, -1]))

    ref_logp = np.take_along_axis(np.asarray(jax.nn.log_softmax(last(ref, ref.logits, ids, mask))), pair, axis=1)
    if cfg.head.q_type:  # every next token's value at the prefix: [n, V, K]
        logits = np.take_along_axis(last(value.backbone, value.head, ids, mask), pair[:, :, None], axis=1)
    else:  # the value of the prefix extended by each digit
        logits = np.stack([last(value.backbone, value.head, *left_pad([r[0] + [r[1 + j]] for r in rows], pad))
                           for j in (0, 1)], axis=1)
    atoms, eta = cfg.head.atoms, cfg.algorithm.eta
    mean = np.asarray(jax.nn.softmax(logits, axis=-1) @ atoms)  # [n, 2]
    offsets = {"pretrained": np.zeros_like(mean), "cd": np.asarray(guidance.cd_logit_offset(logits, atoms, eta)),
               "qsharp": np.asarray(guidance.qsharp_logit_offset(logits, atoms, eta))}
    kept = {m: 1 / (1 + np.exp(np.diff(ref_logp + o, axis=1)[:, 0])) for m, o in offsets.items()}
    p = cfg.problems
    rate = p.p_check * p.p_carry_checked + (1 - p.p_check) * p.p_carry
    return [{"carries_ahead": int(k), "decisions": int((ahead == k).sum()),
             **{m: float(v[ahead == k].mean()) for m, v in kept.items()},
             "value_kept": float(mean[ahead == k, 0].mean()), "value_lost": float(mean[ahead == k, 1].mean()),
             "exact_kept": rate ** int(k)} for k in np.unique(ahead)]


def decisions_markdown(rows: list[dict[str, Any]], eta: float) -> str:
    """:func:`carry_decisions`' rows as a Markdown section of results.md."""
    lines = ["", f"At each carry of the right solutions: P(the carried digit | carried or forgotten), η = {eta:g}; "
             "the value model's E[R] after each digit (exact: p^ahead after the carried one, 0 after the forgotten one)",
             "", "| carries ahead | decisions | π_ref | CD | Q♯ | E[R] carried | E[R] forgotten | exact carried |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['carries_ahead']} | {r['decisions']} | {r['pretrained']:.3f} | {r['cd']:.3f} | {r['qsharp']:.3f} | "
              f"{r['value_kept']:.3f} | {r['value_lost']:.3f} | {r['exact_kept']:.3f} |" for r in rows]
    return "\n".join(lines) + "\n"


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
        decisions = carry_decisions(cfg, tokenizer, test_set, ref, state.model())
        seconds["evaluation"] = round(time.time() - started - sum(seconds.values()), 1)
    finally:
        task.close()
    results = {"eta": algo.eta, **results, "carry_decisions": decisions, "problems": len(task.evaluation),
               "samples": ev.samples, "test_file": "generated addition problems", "temperature": algo.temperature,
               "top_p": algo.top_p, "seed": cfg.seed, "level_name": "carries", "seconds": seconds,
               "config": config_lib.as_json(cfg)}
    eval_math.write(run_dir, results, samples, task.evaluation, name="results",
                    extra_markdown=decisions_markdown(decisions, algo.eta))
    return results


def print_summary(results: dict[str, Any], run_dir: str) -> None:
    print((Path(run_dir) / "results.md").read_text(), end="")
    print(f"written: {run_dir}/results.json, results.md, kl_sweep.png, samples.jsonl ({results['seconds']} s)")
