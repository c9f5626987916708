"""``qsharp eval-math``: the paper's Table 1 for a math run — π_ref, CD and Q♯ sampled on a set of
problems (GSM8K test, MATH-500, or the run's own evaluation split), scored by answer.

For each method every problem gets ``samples`` completions (the paper: 8 at T = 0.8, top-p 0.9);
pass@1 is their mean correctness, maj1@k the majority vote over them, KL the paper's: the mean over
samples of Σ_t KL(π_g,t ‖ π_ref,t), π_g = π_ref's logits plus the guidance offsets at temperature 1
before truncation (π_ref's own is 0; :attr:`~qsharp_jax.rollout.Rollout.guidance_kl`), and
``policy_kl`` the KL of what was actually sampled (temperature, top-k, top-p included). CD and Q♯ use the run's one categorical value model with the two offsets
(mean return / log E[exp(R/η)]); every method samples with the same keys (common random
numbers: their differences are less noisy than independent draws). Written to ``out``:

- ``eval.json``: settings, and per method the metrics, their 95% bootstrap intervals over
  problems, the share of samples with no answer, verifier time-outs, and (MATH) per-level and
  per-subject means; ``sweep``: pass@1 and KL of the guided methods at more η;
- ``eval.md``: the Table-1-shaped Markdown table and the breakdowns;
- ``samples.jsonl``: per problem, the gold answer and each method's answers (to inspect);
- ``kl_sweep.png`` (with a sweep): pass@1 against KL, one line per guided method over η.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np

from qsharp_jax import algorithm, distributed, rollout, runs
from qsharp_jax import config as config_lib
from qsharp_jax import sharding as sharding_lib
from qsharp_jax.storage import atomic_write, check_local_path
from qsharp_jax.tasks.math_data import Problem, encode_prompts, load_source
from qsharp_jax.tasks.math_eval import Samples, breakdown, per_problem, summarize, table
from qsharp_jax.tasks.math_task import MathTask

Method = Literal["pretrained", "cd", "qsharp", "bernoulli"]
LABELS = {"pretrained": "π_ref", "cd": "CD", "qsharp": "Q♯", "bernoulli": "Q♯ (Bernoulli)"}


@dataclasses.dataclass(frozen=True)
class EvalMathConfig:
    """Settings of ``qsharp eval-math RUN [key=value ...]`` (0 / "" / empty: take the run's).

    Fields:
      run: a run directory of ``qsharp train`` (its config and newest checkpoint), or a run
        config YAML (its ``run_dir``'s checkpoint; none needed when only ``pretrained`` is asked).
      test_file: the problems (JSONL, as ``math.train_file``); "": the run's evaluation problems.
      methods: the policies: ``pretrained`` (π_ref), ``cd``, ``qsharp`` (categorical value head),
        ``bernoulli`` (Bernoulli head).
      samples: completions per problem; maj1@samples is the majority vote over all of them.
      eta: η of the guided methods (0: the run's ``algorithm.eta``).
      lookahead: π_ref steps after each candidate at which a V-type value is read (see
        ``rollout.generate``; None: the run's ``algorithm.lookahead``).
      sweep: more η at which the guided methods are sampled (pass@1 and KL: the trade-off curve).
      temperature, top_p, max_new_tokens: of the final policies (0: the run's).
      max_problems: evaluate the first this-many problems (0: all).
      batch: rows per decoding call (0: the run's ``algorithm.rollout_batch``).
      seed: of the sampling keys and of maj@k's tie-breaks.
      resamples: bootstrap resamples of the confidence intervals.
      out: output directory ("": ``<run_dir>/eval``).
      mesh: (data, fsdp, tensor) devices to lay π_ref and the value model out on, whatever the run
        trained on (None: one device; on a pod, started as ``qsharp train`` is, every device as
        ``data``: each host decodes and checks its rows, process 0 writes).
    """

    run: str = ""
    test_file: str = ""
    methods: tuple[Method, ...] = ("pretrained", "cd", "qsharp")
    samples: int = 8
    eta: float = 0.0
    lookahead: int | None = None
    sweep: tuple[float, ...] = ()
    temperature: float = 0.0
    top_p: float = 0.0
    max_new_tokens: int = 0
    max_problems: int = 0
    batch: int = 0
    seed: int = 0
    resamples: int = 2000
    out: str = ""
    mesh: tuple[int, int, int] | None = None

    def __post_init__(self):
        if not self.run:
            raise ValueError("eval-math needs a run: a run directory of `qsharp train` or its config YAML")
        check_local_path(self.out, "out")
        bad = [f"{k}={getattr(self, k)}" for k in ("samples", "resamples") if getattr(self, k) < 1]
        bad += [f"lookahead={self.lookahead}"] if self.lookahead is not None and self.lookahead < 0 else []
        bad += [f"{k}={getattr(self, k)}" for k in ("eta", "temperature", "top_p", "max_new_tokens", "max_problems",
                                                     "batch") if getattr(self, k) < 0]
        bad += [f"sweep has η={e}" for e in self.sweep if not e > 0]
        bad += [f"top_p={self.top_p}"] if self.top_p > 1 else []
        if bad or not self.methods or len(set(self.methods)) != len(self.methods):
            raise ValueError(f"eval-math: need samples, resamples >= 1, η > 0, top_p in (0, 1], the rest >= 0 and "
                             f"distinct methods; got {', '.join(bad) or f'methods={list(self.methods)}'}")


def _problems(cfg: EvalMathConfig, run_cfg: runs.RunConfig, task: MathTask):
    """(prompt ids, mask, problems) to evaluate, encoded as the task encodes its own."""
    if not cfg.test_file:
        problems = task.evaluation
        ids, mask = task.eval_prompts()
    else:
        loaded = load_source(cfg.test_file, run_cfg.math.tfds_data_dir)
        ids, mask, kept = encode_prompts(task.tokenizer, loaded, run_cfg.math.max_prompt_len, task.pad_id)
        problems = [loaded[i] for i in kept]
    if cfg.max_problems:
        problems, ids, mask = problems[: cfg.max_problems], ids[: cfg.max_problems], mask[: cfg.max_problems]
    return ids, mask, problems


def _load(cfg: EvalMathConfig):
    """The run's config, task, π_ref and (None before any checkpoint) value model state."""
    path = Path(cfg.run)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"{path} is not a run directory of `qsharp train` (no config.json)")
        run_cfg = config_lib.load(runs.RunConfig, path / "config.json")
        run_dir = path
    else:
        run_cfg = config_lib.load(runs.RunConfig, path)
        run_dir = Path(run_cfg.run_dir)
    if run_cfg.task != "math":
        raise ValueError(f"{cfg.run} is a run of task {run_cfg.task!r}; eval-math evaluates task: math runs "
                         "(use `qsharp eval` for other tasks)")
    task, ref, value = runs.build(run_cfg)
    devices = runs.resolve_mesh(cfg.mesh)
    if devices is not None:
        ref = sharding_lib.place(ref, devices)
    state = None
    if any(m != "pretrained" for m in cfg.methods):
        try:
            state, _ = algorithm.latest_state(run_cfg.algorithm, value, run_dir, mesh=devices)
        except FileNotFoundError:
            raise ValueError(f"{run_dir} has no checkpoint yet: train first (qsharp train), or ask only for "
                             "methods=[pretrained]") from None
        kind = value.head_cfg.kind
        wrong = [m for m in cfg.methods if m != "pretrained" and (m == "bernoulli") != (kind == "bernoulli")]
        if wrong:
            raise ValueError(f"methods {wrong} do not fit the run's {kind} value head (categorical: cd, qsharp; "
                             "bernoulli: bernoulli)")
    return run_cfg, run_dir, task, ref, state


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How every method is sampled: ``samples`` per problem, decoding ``settings`` (of
    :func:`rollout.generate`: max_new_tokens, top_k, temperature, top_p, eos_id, pad_id), rows per
    decoding call ``batch``, and the ``seed`` of the keys and of maj@k's tie-breaks."""

    samples: int
    settings: dict[str, Any]
    batch: int
    seed: int = 0


def sample_method(task: MathTask, ref, value_model, method: str, eta: float, ids: np.ndarray, mask: np.ndarray,
                  golds: list[str], sampling: Sampling, *, lookahead: int = 0, progress: bool = True
                  ) -> tuple[Samples, np.ndarray]:
    """``sampling.samples`` completions per problem of one method (``value_model`` None for
    ``pretrained``): their answers, correctness and the guidance's KL (:class:`Samples`), and the
    sampled policy's KL float ``[problems, samples]``."""
    k = sampling.samples
    prompts, prompt_mask = np.repeat(ids, k, axis=0), np.repeat(mask, k, axis=0)
    guided = {} if method == "pretrained" else dict(value_model=value_model, guidance=method, eta=eta,
                                                    lookahead=lookahead)
    repeated = [g for g in golds for _ in range(k)]

    def score(rows, out):  # beside the next chunk's decoding: (correct, answer) per row
        answers = task.answers(out.tokens, out.mask)
        pairs = np.empty(len(rows), object)
        pairs[:] = list(zip(task.check(answers, [repeated[r] for r in rows]).tolist(), answers))
        return pairs

    out, scored = rollout.generate_chunked(
        ref, prompts, prompt_mask, key=jax.random.key(sampling.seed), batch=sampling.batch,
        name=f"{LABELS[method]} η={eta:g}" if guided else LABELS[method], score=score, progress=progress,
        samples_per_prompt=k, **sampling.settings, **guided)
    n = len(golds)
    samples = Samples(answers=[[a for _, a in scored[i * k:(i + 1) * k]] for i in range(n)],
                      correct=np.array([c for c, _ in scored], bool).reshape(n, k),
                      kl=np.asarray(out.guidance_kl, np.float64).reshape(n, k))
    return samples, np.asarray(out.kl, np.float64).reshape(n, k)


def report(samples: Samples, policy_kl: np.ndarray, problems: list[Problem], *, seed: int = 0, resamples: int = 2000,
           timeouts: int = 0) -> dict[str, Any]:
    """One method's metrics (pass@1, maj1@k, KL, with 95% bootstrap intervals), share of samples
    with no answer, verifier time-outs, and means per level / subject where the problems have them."""
    k = np.shape(samples.correct)[1]
    values = per_problem(samples, [p.answer for p in problems], k, seed=seed)
    values = {(f"maj1@{k}" if name == "maj1@k" else name): v for name, v in values.items()}
    stats = summarize(values, resamples=resamples, seed=seed)
    out: dict[str, Any] = {name: s["mean"] for name, s in stats.items()}
    out["ci95"] = {name: [s["lo"], s["hi"]] for name, s in stats.items()}
    out["policy_kl"] = float(policy_kl.mean())
    out["no_answer"] = float(np.mean([[a is None for a in row] for row in samples.answers]))
    out["verifier_timeouts"] = timeouts
    for attribute in ("level", "subject"):
        groups = [getattr(p, attribute) for p in problems]
        if any(g is not None for g in groups):
            out[f"by_{attribute}"] = breakdown(values, groups)
    return out


def evaluate_methods(task: MathTask, ref, value_model, problems: list[Problem], ids: np.ndarray, mask: np.ndarray,
                     sampling: Sampling, *, methods: tuple[str, ...], eta: float, sweep: tuple[float, ...] = (),
                     sweep_sampling: Sampling | None = None, resamples: int = 2000, lookahead: int = 0,
                     progress: bool = True) -> tuple[dict[str, Any], dict[str, Samples]]:
    """Every method's :func:`report` at η, and pass@1 / KL of the guided ones at each η of
    ``sweep`` (sampled with ``sweep_sampling``, default ``sampling``): ``({"methods", "sweep"},
    {method: Samples})``."""
    golds = [p.answer for p in problems]
    results: dict[str, Any] = {"methods": {}, "sweep": []}
    all_samples = {}
    for method in methods:
        before = task.timeouts
        all_samples[method], policy_kl = sample_method(task, ref, value_model, method, eta, ids, mask, golds, sampling,
                                                       lookahead=lookahead, progress=progress)
        timeouts = sum(distributed.gather_objects(task.timeouts - before))  # each host checked its own rows
        results["methods"][method] = report(all_samples[method], policy_kl, problems, seed=sampling.seed,
                                            resamples=resamples, timeouts=timeouts)
    sweep_sampling = sweep_sampling or sampling
    for sweep_eta in sweep:
        for method in (m for m in methods if m != "pretrained"):
            if sweep_eta == eta and sweep_sampling == sampling:
                s = all_samples[method]
            else:
                s = sample_method(task, ref, value_model, method, sweep_eta, ids, mask, golds, sweep_sampling,
                                  lookahead=lookahead, progress=progress)[0]
            results["sweep"].append({"eta": sweep_eta, "method": method, "pass@1": float(np.mean(s.correct)),
                                     "kl": float(np.mean(s.kl))})
    return results, all_samples


def evaluate_math(cfg: EvalMathConfig, *, progress: bool = True) -> dict[str, Any]:
    """Sample and score every method (and the η sweep); write ``eval.json``, ``eval.md``,
    ``samples.jsonl`` (and ``kl_sweep.png``) to ``cfg.out``; returns what ``eval.json`` holds.
    On a pod every process calls it (the same ``cfg``); process 0 writes."""
    distributed.check_same_everywhere("the eval-math config", config_lib.as_json(cfg))
    run_cfg, run_dir, task, ref, state = _load(cfg)
    try:
        out_dir = Path(cfg.out) if cfg.out else run_dir / "eval"
        distributed.on_main("eval-math/out", lambda: out_dir.mkdir(parents=True, exist_ok=True))
        ids, mask, problems = _problems(cfg, run_cfg, task)
        algo = run_cfg.algorithm
        eta = cfg.eta or algo.eta
        lookahead = algo.lookahead if cfg.lookahead is None else cfg.lookahead
        sampling = Sampling(samples=cfg.samples, batch=cfg.batch or algo.rollout_batch, seed=cfg.seed, settings=dict(
            max_new_tokens=cfg.max_new_tokens or algo.max_new_tokens, top_k=algo.top_k,
            temperature=cfg.temperature or algo.temperature, top_p=cfg.top_p or algo.top_p, eos_id=task.eos_id,
            pad_id=task.pad_id))
        results: dict[str, Any] = {
            "run": str(run_dir), "test_file": cfg.test_file or "(the run's evaluation problems)",
            "problems": len(problems), "samples": cfg.samples, "eta": eta, "lookahead": int(lookahead), "seed": cfg.seed,
            "temperature": sampling.settings["temperature"], "top_p": sampling.settings["top_p"],
            "max_new_tokens": sampling.settings["max_new_tokens"]}
        evaluated, all_samples = evaluate_methods(
            task, ref, None if state is None else state.model(), problems, ids, mask, sampling, methods=cfg.methods,
            eta=eta, sweep=cfg.sweep, resamples=cfg.resamples, lookahead=lookahead,
            progress=progress and distributed.is_main())
        results.update(evaluated)
        distributed.on_main("eval-math/written", lambda: write(out_dir, results, all_samples, problems))
        return results
    finally:
        runs.close_task(task)


def markdown(results: dict[str, Any]) -> str:
    """``eval.json``'s content as Markdown: the Table-1 row per method, then the breakdowns."""
    k = results["samples"]
    rows = {LABELS[m]: {short: {"mean": r[name], "lo": r["ci95"][name][0], "hi": r["ci95"][name][1]}
                        for short, name in (("pass@1", "pass@1"), ("maj1@k", f"maj1@{k}"), ("kl", "kl"))}
            for m, r in results["methods"].items()}
    text = (f"{results['problems']} problems ({results['test_file']}), {k} samples each, η = {results['eta']:g}, "
            f"T = {results['temperature']:g}, top-p = {results['top_p']:g}; 95% bootstrap intervals over problems.\n\n"
            + table(rows, k))
    for attribute in ("level", "subject"):
        methods = [m for m in results["methods"] if f"by_{attribute}" in results["methods"][m]]
        if not methods:
            continue
        groups = results["methods"][methods[0]][f"by_{attribute}"]
        title = results.get(f"{attribute}_name", attribute)  # what the level stands for (the demo: carries)
        text += (f"\npass@1 (%) by {title}\n\n| {title} | problems | "
                 + " | ".join(LABELS[m] for m in methods) + " |\n|---|---|" + "---|" * len(methods) + "\n")
        for g, row in groups.items():
            text += f"| {g} | {row['problems']} | " + " | ".join(
                f"{100 * results['methods'][m][f'by_{attribute}'][g]['pass@1']:.1f}" for m in methods) + " |\n"
    if results["sweep"]:
        text += "\n| η | method | pass@1 (%) | KL |\n|---|---|---|---|\n" + "".join(
            f"| {s['eta']:g} | {LABELS[s['method']]} | {100 * s['pass@1']:.1f} | {s['kl']:.3f} |\n"
            for s in results["sweep"])
    return text


def write(out_dir: Path, results: dict[str, Any], all_samples: dict[str, Samples], problems: list[Problem],
          name: str = "eval", extra_markdown: str = "") -> None:
    """``<name>.json``, ``<name>.md`` (+ ``extra_markdown``: a caller's own sections),
    ``samples.jsonl`` (and ``kl_sweep.png``) into ``out_dir``."""
    atomic_write(out_dir / f"{name}.json", lambda f: f.write(json.dumps(results, indent=1, allow_nan=False).encode()))
    atomic_write(out_dir / f"{name}.md", lambda f: f.write((markdown(results) + extra_markdown).encode()))
    lines = []
    for i, p in enumerate(problems):
        lines.append(json.dumps({"id": p.id, "problem": p.problem, "gold": p.answer, **{
            m: {"answers": s.answers[i], "correct": s.correct[i].tolist()} for m, s in all_samples.items()}}))
    atomic_write(out_dir / "samples.jsonl", lambda f: f.write(("\n".join(lines) + "\n").encode()))
    if results["sweep"]:
        plot_sweep(results, out_dir / "kl_sweep.png")


def plot_sweep(results: dict[str, Any], out: Path) -> Path:
    """pass@1 against KL to π_ref, one line per guided method over the swept η (π_ref a point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for i, method in enumerate(dict.fromkeys(s["method"] for s in results["sweep"])):
        points = sorted((s["eta"], s["kl"], 100 * s["pass@1"]) for s in results["sweep"] if s["method"] == method)
        ax.plot([p[1] for p in points], [p[2] for p in points], "o-", label=LABELS[method])
        labels: dict[tuple[float, float], list[str]] = {}  # points that coincide share one label
        for eta, kl, acc in points:
            labels.setdefault((round(kl, 1), round(acc)), []).append(f"{eta:g}")
        for (kl, acc), etas in labels.items():
            ax.annotate("η=" + ", ".join(etas), (kl, acc), fontsize=7, color=f"C{i}", textcoords="offset points",
                        xytext=(4, 4 if i % 2 else -10))
    if "pretrained" in results["methods"]:
        ax.plot([0], [100 * results["methods"]["pretrained"]["pass@1"]], "s", color="C7", label="π_ref")
    # KL spans orders of magnitude over η (and π_ref's is 0): linear near 0, logarithmic beyond
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set(xlabel="KL(π ‖ π_ref) per response", ylabel="pass@1 (%)", title="accuracy against KL over η")
    ax.grid(alpha=0.3)
    ax.legend(loc="center right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
