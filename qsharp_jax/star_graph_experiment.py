"""The star-graph experiment: π_ref pretraining, then Q♯, CD, REINFORCE, DPO and RPO on one harness.

``run(cfg)`` writes into ``cfg.run_dir``:

* ``results.json``: ``{"graph": {...}, "methods": {name: {"test_accuracy", "first_step_accuracy",
  "kl"}}, "seconds": {...}}``, rewritten after every method, so a killed run resumes at the first
  method without a result (π_ref and the Q♯ driver resume from their own checkpoints);
* ``results.md`` (the table) and ``accuracy.png`` (test accuracy per method, like the paper's
  figure); ``reference/`` (π_ref's checkpoint), ``qsharp/`` (the Algorithm 1 run directory),
  ``tokenizer/`` (a Hugging Face tokenizer of the vocabulary).

Every method is evaluated the same way: one sample per test graph, top-k 10, temperature 1; "kl"
is Σ_t KL(π_t ‖ π_ref,t) along the sampled answers (see ``rollout.generate``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from qsharp_jax import policy, qsharp, rollout, train
from qsharp_jax.baselines import dpo, reinforce
from qsharp_jax.checkpoint import Checkpoints
from qsharp_jax.data import star_graph as sg
from qsharp_jax.data.storage import atomic_write
from qsharp_jax.models.build import ModelSpec, build_reference, build_value
from qsharp_jax.models.transformer import Transformer
from qsharp_jax.models.value import HeadConfig, ValueModel, value_from_reference
from qsharp_jax.train import OptimizerConfig

METHODS = ("pretrained", "qsharp", "cd", "reinforce", "dpo", "rpo")
LABELS = {"pretrained": "π_ref (pretrained)", "qsharp": "Q♯", "cd": "CD", "reinforce": "REINFORCE", "dpo": "DPO",
          "rpo": "RPO"}


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """π_ref: next-token prediction with teacher forcing on the answers."""

    epochs: int = 10
    batch_size: int = 256
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-3, weight_decay=0.1, warmup_steps=100)


@dataclasses.dataclass(frozen=True)
class ReinforceConfig:
    """Policy gradient from π_ref: +1 for a correct path, −0.1 otherwise, no KL (as the paper)."""

    steps: int = 200
    batch_size: int = 128
    right: float = 1.0
    wrong: float = -0.1
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-4, weight_decay=0.1)


@dataclasses.dataclass(frozen=True)
class PreferenceConfig:
    """DPO / RPO (β = 0.1): chosen = the true path, rejected = a wrong π_ref sample."""

    pairs: int = 20000
    epochs: int = 2
    batch_size: int = 128
    beta: float = 0.1
    rpo_nll_weight: float = 1.0
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=1e-4, weight_decay=0.1)


@dataclasses.dataclass(frozen=True)
class ValuePretrainConfig:
    """Reward-free warm-up of the value model before Algorithm 1: on random walks over each training
    prompt's nodes, predict whether each step is an edge of the prompt (``sg.edge_walks``). It gives
    the value model the pair-matching circuit that outcome labels alone do not find at laptop scale
    (the paper's value model inherits such circuits from pretrained GPT-2); ``walks=0`` skips it."""

    walks: int = 100_000
    epochs: int = 1
    batch_size: int = 64
    optimizer: OptimizerConfig = OptimizerConfig(learning_rate=3e-3, weight_decay=0.0, warmup_steps=50)

    def __post_init__(self):
        if self.walks < 0 or self.epochs < 0:
            raise ValueError(f"value_pretrain.walks and .epochs must be >= 0, got {self.walks} and {self.epochs}")


@dataclasses.dataclass(frozen=True)
class StarGraphConfig:
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
    qsharp: qsharp.AlgorithmConfig = qsharp.AlgorithmConfig(eta=0.1, top_k=10)
    reinforce: ReinforceConfig = ReinforceConfig()
    preference: PreferenceConfig = PreferenceConfig()
    methods: tuple[str, ...] = METHODS
    eval_batch: int = 1000

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
        for name, spec in (("reference", self.reference),) + ((("value", self.value),) if not self.value_from_reference else ()):
            if spec.hf_path is None and spec.vocab_size != vocab:
                raise ValueError(f"{name}.vocab_size={spec.vocab_size} but G over {self.graph.num_nodes} nodes has "
                                 f"{vocab} tokens; set {name}.vocab_size={vocab}")
            length = self.graph.prompt_length + self.graph.answer_length
            if spec.hf_path is None and spec.max_positions < length:
                raise ValueError(f"{name}.max_positions={spec.max_positions} < {length} tokens of prompt + answer")


# --------------------------------------------------------------------------- evaluation

# jitted once here, not per call: each evaluation and each preference set reuses the compilation
_sampled_kl = jax.jit(policy.sampled_kl, static_argnames=("top_k", "temperature"))
_sequence_logprobs = jax.jit(policy.sequence_logprobs)


def sample(cfg: StarGraphConfig, model: Transformer, prompts: np.ndarray, key: jax.Array, **guided) -> rollout.Rollout:
    """Answers to ``prompts`` from ``model`` (guided by ``guided``'s value model, if any), decoded as
    every method is evaluated: top-k and temperature of ``cfg.qsharp``, up to the answer length."""
    vocab = sg.Vocabulary(cfg.graph.num_nodes)
    return rollout.generate(
        model, prompts, np.ones(prompts.shape, bool), key=key, max_new_tokens=cfg.graph.answer_length,
        top_k=cfg.qsharp.top_k, temperature=cfg.qsharp.temperature, eos_id=vocab.eos, pad_id=vocab.pad, **guided,
    )


def evaluate(
    cfg: StarGraphConfig, split: sg.Split, ref: Transformer, *, policy_model: Transformer | None = None,
    value_model=None, guidance: str | None = None, progress: bool = True, desc: str = "evaluate",
) -> dict[str, float]:
    """Test accuracy, first-step accuracy and KL to π_ref of one sample per graph of ``split``.

    The policy is π_ref (nothing given), π_ref guided by ``value_model`` (``guidance`` "qsharp" or
    "cd", η and top-k of ``cfg.qsharp``), or a trained ``policy_model``.
    """
    algo, g = cfg.qsharp, cfg.graph
    n = len(split.prompts)
    rewards, first, kls = [], [], []
    for start in tqdm(range(0, n, cfg.eval_batch), desc=desc, disable=not progress, leave=False):
        prompts = split.prompts[start : start + cfg.eval_batch]
        mask = np.ones(prompts.shape, bool)
        guided = {} if value_model is None else dict(value_model=value_model, guidance=guidance, eta=algo.eta)
        out = sample(cfg, policy_model if policy_model is not None else ref, prompts,
                     jax.random.fold_in(jax.random.key(cfg.seed + 7), start), **guided)
        r, f = sg.score(g, split.answers[start : start + cfg.eval_batch], np.asarray(out.tokens), np.asarray(out.mask))
        rewards.append(r)
        first.append(f)
        if policy_model is None:
            kls.append(np.asarray(out.kl))
        else:
            kls.append(np.asarray(_sampled_kl(policy_model, ref, jnp.asarray(prompts), jnp.asarray(mask), out.tokens,
                                              out.mask, top_k=algo.top_k, temperature=algo.temperature)))
    return {"test_accuracy": float(np.concatenate(rewards).mean()),
            "first_step_accuracy": float(np.concatenate(first).mean()),
            "kl": float(np.concatenate(kls).mean())}


# --------------------------------------------------------------------------- π_ref


def _answer_batch(prompts: np.ndarray, answers: np.ndarray) -> dict[str, np.ndarray]:
    tokens = np.concatenate([prompts, answers], axis=1)
    loss_mask = np.zeros(tokens.shape, bool)
    loss_mask[:, prompts.shape[1] :] = True
    return {"tokens": tokens, "attention_mask": np.ones(tokens.shape, bool), "loss_mask": loss_mask}


def pretrain_reference(cfg: StarGraphConfig, train_split: sg.Split, progress: bool = True) -> Transformer:
    """π_ref by next-token prediction on the train answers; checkpointed in ``run_dir/reference``."""
    model = build_reference(cfg.reference)
    optimizer = train.make_optimizer(cfg.pretrain.optimizer)
    state = train.init_state(model, optimizer, jax.random.key(cfg.seed))
    # π_ref depends on its data too: a checkpoint trained on other graphs is refused, not reused
    meta_config = json.loads(json.dumps(dataclasses.asdict(cfg.pretrain) | {
        "reference": dataclasses.asdict(cfg.reference), "graph": dataclasses.asdict(cfg.graph),
        "train_graphs": cfg.train_graphs, "seed": cfg.seed}))
    checkpoints = Checkpoints(Path(cfg.run_dir) / "reference", keep=1)
    restored = checkpoints.restore(state, meta_config)
    if restored is not None:
        return restored[0].model()
    if cfg.reference.hf_path is None or cfg.pretrain.epochs:
        state, _ = train.fit_epochs(
            state, train.make_train_epoch(policy.next_token_loss, optimizer),
            _answer_batch(train_split.prompts, train_split.answers), epochs=cfg.pretrain.epochs,
            batch_size=cfg.pretrain.batch_size, rng=np.random.default_rng([cfg.seed, 1]), desc="pretrain π_ref",
            progress=progress,
        )
    checkpoints.save(0, state, {"config": meta_config})
    return state.model()


# --------------------------------------------------------------------------- value warm-up


_LOSS_OF_HEAD = {"categorical": "categorical", "bernoulli": "bernoulli", "scalar": "mse"}


def walk_loss(model: ValueModel, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The value head's own loss (categorical / Bernoulli / MSE) against per-position labels
    ``batch["returns"] [N, T]`` where ``batch["loss_mask"]``: the edge-walk warm-up's objective."""
    return train.value_loss(model, batch, kind=_LOSS_OF_HEAD[model.head_cfg.kind])


def pretrain_value(cfg: StarGraphConfig, value: ValueModel, train_split: sg.Split, progress: bool = True) -> ValueModel:
    """``cfg.value_pretrain`` epochs of the edge-walk objective on walks after training prompts."""
    vc = cfg.value_pretrain
    rng = np.random.default_rng([cfg.seed, 6])
    prompts = train_split.prompts[rng.integers(0, len(train_split.prompts), vc.walks)]
    optimizer = train.make_optimizer(vc.optimizer)
    state = train.init_state(value, optimizer, jax.random.key(cfg.seed + 6))
    state, _ = train.fit_epochs(state, train.make_train_epoch(walk_loss, optimizer), sg.edge_walks(cfg.graph, prompts, rng),
                                epochs=vc.epochs, batch_size=min(vc.batch_size, vc.walks), rng=rng,
                                desc="value warm-up (edge walks)", progress=progress)
    return state.model()


# --------------------------------------------------------------------------- baselines


def _copy(model: Transformer) -> Transformer:
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


def train_reinforce(cfg: StarGraphConfig, ref: Transformer, train_split: sg.Split, progress: bool = True) -> Transformer:
    """REINFORCE from π_ref on freshly sampled answers every step (on-policy)."""
    rc, g = cfg.reinforce, cfg.graph
    optimizer = train.make_optimizer(rc.optimizer)
    state = train.init_state(_copy(ref), optimizer, jax.random.key(cfg.seed))
    step = train.make_train_step(reinforce.reinforce_loss, optimizer)
    rng = np.random.default_rng([cfg.seed, 2])
    bar = tqdm(range(rc.steps), desc="REINFORCE", disable=not progress, leave=False)
    for i in bar:
        index = rng.integers(0, len(train_split.prompts), size=rc.batch_size)
        prompts = train_split.prompts[index]
        out = sample(cfg, state.model(), prompts, jax.random.fold_in(jax.random.key(cfg.seed + 3), i))
        correct, _ = sg.score(g, train_split.answers[index], np.asarray(out.tokens), np.asarray(out.mask))
        batch = _answer_batch(prompts, np.asarray(out.tokens))
        batch["attention_mask"][:, prompts.shape[1] :] = np.asarray(out.mask)
        batch["rewards"] = np.asarray(reinforce.shaped_rewards(correct, right=rc.right, wrong=rc.wrong))
        state, _ = step(state, {k: jnp.asarray(v) for k, v in batch.items()})
        bar.set_postfix(accuracy=f"{correct.mean():.2f}")
    return state.model()


def preference_pairs(cfg: StarGraphConfig, ref: Transformer, train_split: sg.Split, progress: bool = True):
    """Chosen = the true path, rejected = a wrong π_ref sample of the same prompt (prompts whose
    sample was right are skipped), with π_ref's sequence log-probs of both."""
    pc, g = cfg.preference, cfg.graph
    count = min(pc.pairs, len(train_split.prompts))
    prompts, answers = train_split.prompts[:count], train_split.answers[:count]
    samples, masks = [], []
    for start in tqdm(range(0, count, cfg.eval_batch), desc="π_ref samples for DPO", disable=not progress, leave=False):
        chunk = prompts[start : start + cfg.eval_batch]
        out = sample(cfg, ref, chunk, jax.random.fold_in(jax.random.key(cfg.seed + 4), start))
        samples.append(np.asarray(out.tokens))
        masks.append(np.asarray(out.mask))
    samples, masks = np.concatenate(samples), np.concatenate(masks)
    wrong = sg.score(g, answers, samples, masks)[0] == 0
    if not wrong.any():
        raise ValueError(f"π_ref answered all {count} preference prompts correctly: there is no rejected answer for "
                         "DPO/RPO (raise preference.pairs, or leave dpo/rpo out of methods)")
    chosen = _answer_batch(prompts[wrong], answers[wrong])
    rejected = _answer_batch(prompts[wrong], samples[wrong])
    rejected["attention_mask"][:, prompts.shape[1] :] = masks[wrong]
    ref_of = lambda b: np.concatenate([  # noqa: E731
        np.asarray(_sequence_logprobs(ref, {k: jnp.asarray(v[i : i + cfg.eval_batch]) for k, v in b.items()}))
        for i in range(0, len(b["tokens"]), cfg.eval_batch)
    ])
    return {"chosen": chosen, "rejected": rejected, "ref_chosen": ref_of(chosen), "ref_rejected": ref_of(rejected)}


def train_preference(cfg: StarGraphConfig, ref: Transformer, pairs: dict, *, nll_weight: float, seed: int,
                     progress: bool = True, desc: str = "DPO") -> Transformer:
    pc = cfg.preference
    optimizer = train.make_optimizer(pc.optimizer)
    state = train.init_state(_copy(ref), optimizer, jax.random.key(seed))
    loss = lambda m, b: dpo.preference_loss(m, b, beta=pc.beta, nll_weight=nll_weight)  # noqa: E731
    batch_size = min(pc.batch_size, len(pairs["ref_chosen"]))
    state, _ = train.fit_epochs(state, train.make_train_epoch(loss, optimizer), pairs, epochs=pc.epochs,
                                batch_size=batch_size, rng=np.random.default_rng([seed, 5]), desc=desc,
                                progress=progress)
    return state.model()


# --------------------------------------------------------------------------- the experiment


def run(cfg: StarGraphConfig, *, progress: bool = True) -> dict[str, Any]:
    """Run (or resume) every method of ``cfg.methods``; returns the results dict (see module doc)."""
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    g = cfg.graph
    # `methods` only selects what runs: more methods can be added to a run later
    config = json.loads(json.dumps(dataclasses.asdict(dataclasses.replace(cfg, methods=()))))
    results_file = run_dir / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    if results and results.get("config") != config:
        raise ValueError(f"{run_dir} holds results of another config; use a new run_dir (or delete {results_file})")
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

    started = time.time()
    ref = pretrain_reference(cfg, train_split, progress)
    todo = [m for m in cfg.methods if m not in results["methods"]]
    if "pretrained" in todo:
        record("pretrained", started, evaluate(cfg, test_split, ref, progress=progress, desc="evaluate π_ref"))
    if {"qsharp", "cd"} & set(todo):
        started = time.time()
        task = sg.StarGraphTask(g, train_split, test_split)
        value = value_from_reference(ref, cfg.head, seed=cfg.value.seed) if cfg.value_from_reference else \
            build_value(cfg.value, cfg.head)
        if cfg.value_pretrain.walks:
            value = pretrain_value(cfg, value, train_split, progress)
        qsharp.run(cfg.qsharp, task, ref, value, run_dir / "qsharp", progress=progress)
        state, _ = qsharp.latest_state(cfg.qsharp, value, run_dir / "qsharp")
        for name, guidance in (("qsharp", "qsharp"), ("cd", "cd")):
            if name in todo:
                record(name, started, evaluate(cfg, test_split, ref, value_model=state.model(), guidance=guidance,
                                               progress=progress, desc=f"evaluate {LABELS[name]}"))
                started = time.time()
    if "reinforce" in todo:
        started = time.time()
        model = train_reinforce(cfg, ref, train_split, progress)
        record("reinforce", started, evaluate(cfg, test_split, ref, policy_model=model, progress=progress,
                                              desc="evaluate REINFORCE"))
    if {"dpo", "rpo"} & set(todo):
        started = time.time()
        pairs = preference_pairs(cfg, ref, train_split, progress)
        for offset, (name, weight) in enumerate((("dpo", 0.0), ("rpo", cfg.preference.rpo_nll_weight))):
            if name in todo:
                model = train_preference(cfg, ref, pairs, nll_weight=weight, seed=cfg.seed + 1 + offset,
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
    text = "\n".join(lines) + "\n"
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
