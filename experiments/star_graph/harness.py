"""The paper's star-graph experiment: π_ref pretraining, then Q♯, CD, REINFORCE, DPO and RPO on one
harness. ``python -m experiments.star_graph CONFIG [key=value ...]`` (``make demo`` runs demo.yaml).

``run(cfg)`` writes into ``cfg.run_dir``:

* ``results.json``: ``{"graph": {...}, "methods": {name: {"test_accuracy", "first_step_accuracy",
  "kl"}}, "seconds": {...}}``, rewritten after every method, so a killed run resumes at the first
  method without a result (π_ref and the Q♯ driver resume from their own checkpoints);
* ``results.md`` (the table) and ``accuracy.png`` (test accuracy per method, like the paper's
  figure); ``reference/`` (π_ref's checkpoint), ``qsharp/`` (the Algorithm 1 run directory),
  ``tokenizer/`` (a Hugging Face tokenizer of the vocabulary).

Every method is evaluated the same way, with ``cfg.evaluation``'s decoding settings (one sample
per test graph; default top-k 10, temperature 1); "kl" is Σ_t KL(π_t ‖ π_ref,t) along the sampled
answers (see ``rollout.generate``). The library does the work: Algorithm 1
(:mod:`qsharp_jax.algorithm`), the baselines (:mod:`qsharp_jax.baselines`), the task
(:mod:`qsharp_jax.tasks.star_graph`); this module only configures and compares them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from experiments.star_graph.warmup import ValuePretrainConfig, pretrain_value
from qsharp_jax import algorithm, objectives, rollout
from qsharp_jax import config as config_lib
from qsharp_jax.baselines import dpo, reinforce
from qsharp_jax.models.build import ModelSpec, build_reference, build_value
from qsharp_jax.models.transformer import Transformer
from qsharp_jax.models.value import HeadConfig, value_from_reference
from qsharp_jax.storage import atomic_write
from qsharp_jax.tasks import star_graph as sg
from qsharp_jax.sft import SFTConfig, train_sft

METHODS = ("pretrained", "qsharp", "cd", "reinforce", "dpo", "rpo")
LABELS = {"pretrained": "π_ref (pretrained)", "qsharp": "Q♯", "cd": "CD", "reinforce": "REINFORCE", "dpo": "DPO",
          "rpo": "RPO"}


# π_ref's next-token training on the answers (the library's SFT)
PretrainConfig = SFTConfig


@dataclasses.dataclass(frozen=True)
class DecodingConfig:
    """How every method's answers are sampled for evaluation and for the baselines' training
    (Q♯'s own collection uses ``qsharp``'s settings).

    Fields:
      top_k: truncation of the sampling policy (paper: 10).
      temperature: of the sampling policy (paper: 1).
      batch: test graphs per ``rollout.generate`` call.
    """

    top_k: int = 10
    temperature: float = 1.0
    batch: int = 1000

    def __post_init__(self):
        if self.top_k < 1 or self.batch < 1 or not self.temperature > 0:
            raise ValueError(f"evaluation: top_k >= 1, batch >= 1 and temperature > 0 needed, got {self.top_k}, "
                             f"{self.batch}, {self.temperature}")


@dataclasses.dataclass(frozen=True)
class StarGraphConfig:
    """The whole comparison.

    Fields:
      run_dir: where results, checkpoints and the Q♯ run go (a run there is resumed).
      graph: G(degree, path_length) over num_nodes labels.
      train_graphs, test_graphs: split sizes (paper: 200k, 20k).
      seed: the graphs' and splits' seed, π_ref's pretraining, the baselines' and the evaluation's;
        Q♯'s own draws (rollouts, switch times, fit batches) follow ``qsharp.seed`` and the value
        model's initialization ``value.seed``, which it does not change.
      reference, pretrain: π_ref's sizes and its next-token training.
      value, head: the value model (``value`` is used only when ``value_from_reference`` is False).
      value_from_reference: start the value backbone as a copy of the trained π_ref.
      value_pretrain: the reward-free edge-walk warm-up (``walks=0``: none).
      qsharp: Algorithm 1's settings (shared by Q♯ and CD, which differ only in guidance).
      reinforce, preference: the baselines' settings.
      evaluation: how every method is sampled and scored.
      methods: which of ``METHODS`` to run (more can be added to a finished run).
    """

    run_dir: str = "runs/star_graph"
    graph: sg.GraphConfig = sg.GraphConfig()
    train_graphs: int = 200_000
    test_graphs: int = 20_000
    seed: int = 0
    reference: ModelSpec = ModelSpec(architecture="gpt2", vocab_size=56, hidden_size=64, num_layers=4, num_heads=4,
                                     mlp_dim=256, max_positions=64, seed=0)
    pretrain: PretrainConfig = PretrainConfig()
    value: ModelSpec = ModelSpec(architecture="gpt2", vocab_size=56, hidden_size=64, num_layers=4, num_heads=4,
                                 mlp_dim=256, max_positions=64, seed=1)
    head: HeadConfig = HeadConfig("categorical", 11)
    # the value backbone starts as a copy of the pretrained π_ref (its edge look-ups come for free);
    # False: from `value` (a local Hugging Face LM through hf_path, or a fresh model of its sizes)
    value_from_reference: bool = True
    value_pretrain: ValuePretrainConfig = ValuePretrainConfig()
    qsharp: algorithm.AlgorithmConfig = algorithm.AlgorithmConfig(eta=0.1, top_k=10)
    reinforce: reinforce.ReinforceConfig = reinforce.ReinforceConfig()
    preference: dpo.PreferenceConfig = dpo.PreferenceConfig()
    evaluation: DecodingConfig = DecodingConfig()
    methods: tuple[str, ...] = METHODS

    def __post_init__(self):
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
        vocab = sg.Vocabulary(self.graph.num_nodes).size
        if self.value_pretrain.walks and self.head.q_type:
            raise ValueError("value_pretrain fits a V-type value at each walk node; with a Q-type head set "
                             "value_pretrain.walks=0")
        if self.qsharp.max_new_tokens != self.graph.answer_length:
            raise ValueError(f"qsharp.max_new_tokens={self.qsharp.max_new_tokens} but answers of "
                             f"G({self.graph.degree}, {self.graph.path_length}) have {self.graph.answer_length} tokens; "
                             f"set qsharp.max_new_tokens={self.graph.answer_length}")
        if self.head.kind != "categorical" and ({"qsharp", "cd"} & set(self.methods)):
            raise ValueError(f"Q♯ and CD guide with a categorical head; got head.kind={self.head.kind!r}")
        for name, spec in (("reference", self.reference),) + ((("value", self.value),) if not self.value_from_reference else ()):
            if spec.hf_path is None and spec.vocab_size != vocab:
                raise ValueError(f"{name}.vocab_size={spec.vocab_size} but G over {self.graph.num_nodes} nodes has "
                                 f"{vocab} tokens; set {name}.vocab_size={vocab}")
            length = self.graph.prompt_length + self.graph.answer_length
            if spec.hf_path is None and spec.max_positions < length:
                raise ValueError(f"{name}.max_positions={spec.max_positions} < {length} tokens of prompt + answer")


# --------------------------------------------------------------------------- evaluation

# jitted once here, not per call: each evaluation reuses the compilation
_sampled_kl = jax.jit(objectives.sampled_kl, static_argnames=("top_k", "temperature", "top_p"))


def sample(cfg: StarGraphConfig, model: Transformer, prompts: np.ndarray, prompt_mask: np.ndarray, key: jax.Array,
           **guided) -> rollout.Rollout:
    """Answers to ``prompts`` from ``model`` (guided by ``guided``'s value model, if any), decoded as
    every method is evaluated: ``cfg.evaluation``'s settings, up to the answer length."""
    vocab = sg.Vocabulary(cfg.graph.num_nodes)
    return rollout.generate(
        model, prompts, prompt_mask, key=key, max_new_tokens=cfg.graph.answer_length, top_k=cfg.evaluation.top_k,
        temperature=cfg.evaluation.temperature, eos_id=vocab.eos, pad_id=vocab.pad, **guided,
    )


def evaluate(
    cfg: StarGraphConfig, split: sg.Split, ref: Transformer, *, policy_model: Transformer | None = None,
    value_model=None, guidance: str | None = None, progress: bool = True, desc: str = "evaluate",
) -> dict[str, float]:
    """Test accuracy, first-step accuracy and KL to π_ref of one sample per graph of ``split``.

    The policy is π_ref (nothing given), π_ref guided by ``value_model`` (``guidance`` "qsharp" or
    "cd" with ``cfg.qsharp.eta`` and ``cfg.qsharp.lookahead``), or a trained ``policy_model``.
    """
    ev, g = cfg.evaluation, cfg.graph
    n = len(split.prompts)
    rewards, first, kls = [], [], []
    for start in tqdm(range(0, n, ev.batch), desc=desc, disable=not progress, leave=False):
        prompts = split.prompts[start : start + ev.batch]
        mask = np.ones(prompts.shape, bool)
        guided = {} if value_model is None else dict(value_model=value_model, guidance=guidance, eta=cfg.qsharp.eta,
                                                     lookahead=cfg.qsharp.lookahead)
        out = sample(cfg, policy_model if policy_model is not None else ref, prompts, mask,
                     jax.random.fold_in(jax.random.key(cfg.seed + 7), start), **guided)
        r, f = sg.score(g, split.answers[start : start + ev.batch], np.asarray(out.tokens), np.asarray(out.mask))
        rewards.append(r)
        first.append(f)
        if policy_model is None:
            kls.append(np.asarray(out.kl))
        else:
            kls.append(np.asarray(_sampled_kl(policy_model, ref, jnp.asarray(prompts), jnp.asarray(mask), out.tokens,
                                              out.mask, top_k=ev.top_k, temperature=ev.temperature)))
    return {"test_accuracy": float(np.concatenate(rewards).mean()),
            "first_step_accuracy": float(np.concatenate(first).mean()),
            "kl": float(np.concatenate(kls).mean())}


# --------------------------------------------------------------------------- value-fit diagnostics

_success = jax.jit(lambda model, tokens, mask: jax.nn.softmax(model(tokens, mask)) @ model.head_cfg.atoms)


def success_probabilities(value, tokens: np.ndarray, mask: np.ndarray, batch: int = 1000) -> np.ndarray:
    """A categorical V-type value model's predicted success probability (its mean return, rewards
    in [0, 1]) of every prefix: float ``[N, T]``."""
    return np.concatenate([np.asarray(_success(value, jnp.asarray(tokens[i : i + batch]), jnp.asarray(mask[i : i + batch])))
                           for i in range(0, len(tokens), batch)])


def position_cross_entropy(p: np.ndarray, rewards: np.ndarray, mask: np.ndarray, positions) -> list[float]:
    """Binary cross-entropy of success probabilities ``p [N, T]`` against 0/1 ``rewards [N]`` at each
    of ``positions``, over the rows whose ``mask [N, T]`` holds there (chance: the binary entropy of
    the success rate, ln 2 at 1/2)."""
    p = np.clip(p, 1e-6, 1 - 1e-6)
    ce = -(rewards[:, None] * np.log(p) + (1 - rewards[:, None]) * np.log(1 - p))
    return [float(ce[mask[:, t], t].mean()) for t in positions]


def fit_by_position(cfg: StarGraphConfig, ref: Transformer, split: sg.Split, n: int = 1000):
    """``diagnostics(value_model, iteration)`` for :func:`qsharp_jax.algorithm.run`: the value's
    cross-entropy at each answer position (``value_ce_0``: the prefix ending at "=", before the
    first answer token; ``value_ce_k``: after k answer tokens) on one π_ref answer to each of the
    first ``n`` graphs of ``split`` (held out: test graphs), and ``value_ce_chance``."""
    prompts = split.prompts[:n]
    out = sample(cfg, ref, prompts, np.ones(prompts.shape, bool), jax.random.key(cfg.seed + 8))
    rewards, _ = sg.score(cfg.graph, split.answers[:n], np.asarray(out.tokens), np.asarray(out.mask))
    tokens = np.concatenate([prompts, np.asarray(out.tokens)], axis=1)
    mask = np.concatenate([np.ones(prompts.shape, bool), np.asarray(out.mask)], axis=1)
    first = cfg.graph.prompt_length - 1
    positions = range(first, first + cfg.graph.answer_length + 1)
    rate = float(np.clip(rewards.mean(), 1e-6, 1 - 1e-6))
    chance = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))

    def diagnostics(value, iteration: int) -> dict[str, float]:
        ce = position_cross_entropy(success_probabilities(value, tokens, mask), rewards, mask, positions)
        return {"value_ce_chance": float(chance), **{f"value_ce_{k}": c for k, c in enumerate(ce)}}

    return diagnostics


def fit_table(history: list[dict[str, Any]]) -> str:
    """The per-position cross-entropies of :func:`fit_by_position` per iteration, as Markdown."""
    keys = sorted((k for k in history[0] if k.startswith("value_ce_") and k != "value_ce_chance"),
                  key=lambda k: int(k.rsplit("_", 1)[1]))
    lines = ["", "Q♯'s value model: cross-entropy at each answer position (0: before the answer) on π_ref's answers "
             f"to held-out graphs, after each iteration's fit (chance {history[0]['value_ce_chance']:.3f})", "",
             "| iteration | " + " | ".join(k.rsplit("_", 1)[1] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    lines += [f"| {h['iteration']} | " + " | ".join("–" if h[k] is None else f"{h[k]:.3f}" for k in keys) + " |"
              for h in history]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- π_ref


def pretrain_reference(cfg: StarGraphConfig, train_split: sg.Split, progress: bool = True) -> Transformer:
    """π_ref by next-token prediction on the train answers; checkpointed in ``run_dir/reference``
    (a checkpoint trained on other graphs is refused, not reused)."""
    if cfg.reference.hf_path is not None and not cfg.pretrain.epochs:
        return build_reference(cfg.reference)
    answers = train_split.answers
    meta = {"reference": cfg.reference, "graph": cfg.graph, "train_graphs": cfg.train_graphs}
    return train_sft(cfg.pretrain, build_reference(cfg.reference), train_split.prompts,
                     np.ones(train_split.prompts.shape, bool), answers, np.ones(answers.shape, bool), seed=cfg.seed,
                     directory=Path(cfg.run_dir) / "reference", meta=meta, desc="pretrain π_ref", progress=progress)


def check_shortcut_regime(metrics: dict[str, float], g: sg.GraphConfig) -> None:
    """Warn when π_ref is far from the shortcut regime (test accuracy ≈ 1/degree) the experiment is
    about: below half of it, π_ref has not learned to follow the prompt's edges, its rollouts are
    almost never right, and Q♯/CD have next to nothing to learn from."""
    if metrics["test_accuracy"] < 0.5 / g.degree:
        warnings.warn(f"π_ref's test accuracy {metrics['test_accuracy']:.3f} (first step "
                      f"{metrics['first_step_accuracy']:.3f}) is far below 1/degree = {1 / g.degree:.3f}: it has not "
                      "learned to follow the prompt's edges, so its rollouts are rarely right and the value model "
                      "has little to learn; pretrain π_ref longer (pretrain.epochs, train_graphs) or larger "
                      "(reference.*)", stacklevel=2)


# --------------------------------------------------------------------------- the experiment


def run(cfg: StarGraphConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every method of ``cfg.methods``; returns the results dict (see module doc)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    g = cfg.graph
    # `methods` only selects what runs: more methods can be added to a run later
    config = config_lib.as_json(dataclasses.replace(cfg, methods=()))
    results_file = run_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if results:
        config_lib.check_same(results.get("config") or {}, config, str(results_file),  # older runs: new fields' defaults
                              defaults=config_lib.defaults_of(StarGraphConfig))
    results = results or {"graph": dataclasses.asdict(g), "methods": {}, "seconds": {}, "config": config}
    sg.save_tokenizer(g, run_dir / "tokenizer")
    train_split, test_split = sg.make_splits(g, train=cfg.train_graphs, test=cfg.test_graphs, seed=cfg.seed)

    def record(name: str, started: float, metrics: dict[str, float]):
        results["methods"][name] = metrics
        results["seconds"][name] = round(time.time() - started, 1)
        atomic_write(results_file, lambda f: f.write(json.dumps(results, indent=1).encode()))
        write_table(results, run_dir / "results.md")
        plot_results(results, run_dir / "accuracy.png")
        if progress:
            tqdm.write(f"{LABELS[name]:>20}: test accuracy {metrics['test_accuracy']:.3f}, first step "
                       f"{metrics['first_step_accuracy']:.3f}, KL {metrics['kl']:.3f}")

    task = sg.StarGraphTask(g, train_split, test_split)
    started = time.time()
    ref = pretrain_reference(cfg, train_split, progress)
    todo = [m for m in cfg.methods if m not in results["methods"]]
    if "pretrained" in todo:
        record("pretrained", started, evaluate(cfg, test_split, ref, progress=progress, desc="evaluate π_ref"))
    if "pretrained" in results["methods"]:
        check_shortcut_regime(results["methods"]["pretrained"], g)
    if {"qsharp", "cd"} & set(todo):
        started = time.time()
        value = value_from_reference(ref, cfg.head, seed=cfg.value.seed) if cfg.value_from_reference else \
            build_value(cfg.value, cfg.head)
        if cfg.value_pretrain.walks and cfg.value_pretrain.epochs:
            value = pretrain_value(cfg.value_pretrain, g, value, train_split, seed=cfg.seed, progress=progress)
        diagnostics = None if cfg.head.q_type else fit_by_position(cfg, ref, test_split)  # V-type values only
        history = algorithm.run(cfg.qsharp, task, ref, value, run_dir / "qsharp", progress=progress,
                                diagnostics=diagnostics)
        # iterations recorded without diagnostics (a Q-type head, a run begun by an older version) have none
        fits = [{k: h[k] for k in h if k == "iteration" or k.startswith("value_ce_")}
                for h in history if "value_ce_chance" in h]
        if fits:
            results["value_fit"] = fits
        state, _ = algorithm.latest_state(cfg.qsharp, value, run_dir / "qsharp")
        for name, guidance in (("qsharp", "qsharp"), ("cd", "cd")):
            if name in todo:
                record(name, started, evaluate(cfg, test_split, ref, value_model=state.model(), guidance=guidance,
                                               progress=progress, desc=f"evaluate {LABELS[name]}"))
                started = time.time()
    sample_fn = functools.partial(sample, cfg)
    reward_fn = task.reward
    train_mask = np.ones(train_split.prompts.shape, bool)
    if "reinforce" in todo:
        started = time.time()
        model = reinforce.train_reinforce(cfg.reinforce, ref, train_split.prompts, train_mask, sample_fn, reward_fn,
                                          seed=cfg.seed, progress=progress)
        record("reinforce", started, evaluate(cfg, test_split, ref, policy_model=model, progress=progress,
                                              desc="evaluate REINFORCE"))
    if {"dpo", "rpo"} & set(todo):
        started = time.time()
        pairs = dpo.preference_pairs(cfg.preference, ref, train_split.prompts, train_mask, train_split.answers,
                                     sample_fn, reward_fn, seed=cfg.seed, chunk=cfg.evaluation.batch,
                                     progress=progress)
        for offset, (name, weight) in enumerate((("dpo", 0.0), ("rpo", cfg.preference.rpo_nll_weight))):
            if name in todo:
                model = dpo.train_preference(cfg.preference, ref, pairs, nll_weight=weight, seed=cfg.seed + 1 + offset,
                                             progress=progress, desc=LABELS[name])
                record(name, started, evaluate(cfg, test_split, ref, policy_model=model, progress=progress,
                                               desc=f"evaluate {LABELS[name]}"))
                started = time.time()
    return results


def write_table(results: dict[str, Any], path: Path) -> str:
    g = results["graph"]
    lines = [f"Star graph G({g['degree']}, {g['path_length']}), {g['num_nodes']} node labels; "
             f"1/degree = {1 / g['degree']:.3f}", "",
             "| method | test accuracy | first-step accuracy | KL to π_ref | seconds |", "|---|---|---|---|---|"]
    for name in METHODS:
        m = results["methods"].get(name)
        if m is not None:
            lines.append(f"| {LABELS[name]} | {m['test_accuracy']:.3f} | {m['first_step_accuracy']:.3f} | "
                         f"{m['kl']:.3f} | {results['seconds'].get(name, float('nan')):.0f} |")
    text = "\n".join(lines) + "\n" + (fit_table(results["value_fit"]) if results.get("value_fit") else "")
    atomic_write(path, lambda f: f.write(text.encode()))
    return text


def plot_results(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m in METHODS if m in results["methods"]]
    acc = [results["methods"][m]["test_accuracy"] for m in names]
    g = results["graph"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    bars = ax.bar([LABELS[m] for m in names], acc, color=["#888888" if m == "pretrained" else "#3b75af" for m in names])
    ax.bar_label(bars, fmt="%.2f")
    ax.axhline(1 / g["degree"], ls="--", c="k", lw=1, label="1/degree")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test accuracy")
    ax.set_title(f"Star graph G({g['degree']}, {g['path_length']})")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
