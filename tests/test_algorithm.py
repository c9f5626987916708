"""Algorithm 1 end to end on a toy task with a planted reward (kill -9 and resume: test_faults.py)."""

import dataclasses
import json

import numpy as np
import pytest
from flax import nnx

from qsharp_jax.models.transformer import Transformer, TransformerConfig
from qsharp_jax.models.value import HeadConfig, ValueModel
from qsharp_jax.algorithm import AlgorithmConfig, run
from qsharp_jax.tasks.planted_token import PlantedTokenTask
from qsharp_jax.train import OptimizerConfig

V = 8


class ToyTask(PlantedTokenTask):
    """Prompt (BOS=0, x in 1..3); reward 1 iff the first response token is x + 4."""


def build(seed=0):
    cfg = TransformerConfig(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                            mlp_dim=32, max_positions=16)
    ref = Transformer(cfg, rngs=nnx.Rngs(seed))
    value = ValueModel(cfg, HeadConfig("categorical", 11), rngs=nnx.Rngs(seed + 1))
    algo = AlgorithmConfig(iterations=3, prompts_per_iteration=48, samples_per_prompt=4, max_new_tokens=3, eta=0.05,
                           top_k=V, epochs=20, batch_size=32, seed=seed,
                           optimizer=OptimizerConfig(learning_rate=1e-2, weight_decay=0.0))
    return algo, ToyTask(), ref, value


def test_qsharp_improves_over_reference(tmp_path):
    algo, task, ref, value = build()
    history = run(algo, task, ref, value, tmp_path, progress=False)
    assert [h["iteration"] for h in history] == [0, 1, 2]
    last = history[-1]
    assert last["ref_reward"] < 0.35  # the planted token is rare under π_ref
    assert last["guided_reward"] > last["ref_reward"] + 0.4
    assert last["ref_kl"] == 0.0 and last["guided_kl"] > 0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == history
    # re-running a finished run does nothing and returns the same history
    assert run(algo, task, ref, value, tmp_path, progress=False) == history


def test_packed_fit_has_the_padded_fits_loss(tmp_path):
    """One step over all the rows: packing changes what a step computes on (sequences of packed
    rows, no padding), not its loss."""
    def once(name, **changes):  # fresh models each time: a run consumes its value model's buffers
        algo, task, ref, value = build()
        algo = dataclasses.replace(algo, iterations=1, epochs=1, batch_size=256, **changes)  # 192 rows: one step
        return run(algo, task, ref, value, tmp_path / name, progress=False)[0]

    padded, packed = once("padded"), once("packed", pack_length=15)  # 3 rows of 5 tokens per sequence
    assert packed["fit_examples"] == padded["fit_examples"] == 192
    assert packed["fit_loss"] == pytest.approx(padded["fit_loss"], rel=1e-5)
    with pytest.raises(ValueError, match=r"pack_length=4 is shorter than a row \(prompts of up to 2 tokens \+ "
                                         r"algorithm.max_new_tokens=3\)"):
        once("short", pack_length=4)
    with pytest.raises(ValueError, match="categorical_bellman's targets come from π_ref on each padded row"):
        AlgorithmConfig(pack_length=15, loss="categorical_bellman")


def test_bad_rewards_are_refused(tmp_path):
    algo, task, ref, value = build()

    class Broken(ToyTask):
        def reward(self, prompts, completions, mask):
            return np.full(len(prompts), 2.0)

    with pytest.raises(ValueError, match=r"rewards must lie in \[0, 1\]"):
        run(algo, Broken(), ref, value, tmp_path / "a", progress=False)

    class NotANumber(ToyTask):
        def reward(self, prompts, completions, mask):
            return np.where(np.arange(len(prompts)) == 5, np.nan, 0.0)

    with pytest.raises(ValueError, match="non-finite rewards"):
        run(algo, NotANumber(), ref, value, tmp_path / "nan", progress=False)

    class WrongShape(ToyTask):
        def reward(self, prompts, completions, mask):
            return np.zeros(3)

    with pytest.raises(ValueError, match="task.reward returned shape"):
        run(algo, WrongShape(), ref, value, tmp_path / "b", progress=False)


def test_identical_rewards_warn_and_keep_the_value_model(tmp_path):
    algo, task, ref, value = build()

    class Hopeless(ToyTask):
        def reward(self, prompts, completions, mask):
            return np.zeros(len(prompts), np.float32)

    import dataclasses

    algo = dataclasses.replace(algo, iterations=1)
    with pytest.warns(UserWarning, match="all 192 rewards are identical"):
        history = run(algo, Hopeless(), ref, value, tmp_path, progress=False)
    assert history[0]["fit_loss"] is None and history[0]["guided_reward"] == 0.0  # null in metrics.jsonl
    with pytest.raises(ValueError, match="must be >= 1: prompts_per_iteration=0"):  # refused before any work
        run(dataclasses.replace(algo, prompts_per_iteration=0), task, ref, value, tmp_path / "empty", progress=False)
    assert not (tmp_path / "empty").exists()


def test_two_iterations_beat_reference_at_lower_kl_than_cd(tmp_path):
    """Same data pipeline and value model; Q♯ offsets vs CD's mean offsets (paper: CD is
    suboptimal for the KL-regularized objective). Q♯'s offset log E[exp(Z/η)] tilts π_ref by the
    success probability, CD's E[Z]/η exponentiates it, so CD moves further from π_ref. Measured
    (seed 0, 2-core machines): Q♯ 0.65 at KL 0.95 (2026-12-01), 0.55–0.64 at KL 0.88 (another
    machine, 2026-12-02) vs π_ref 0.15 and CD 0.71 at KL 1.42. Which of Q♯ and CD ends with the
    higher reward is not asserted: CD buys reward with KL, and on 96 rows the two rewards' sampling
    error (~0.07) is as large as their gap; the margin over π_ref depends on the value fit (and on
    the CPU's float rounding through 2 iterations at lr 1e-2), the KL order does not."""
    import dataclasses

    results = {}
    for guidance in ("qsharp", "cd"):
        algo, task, ref, value = build()
        algo = dataclasses.replace(algo, iterations=2, guidance=guidance)
        results[guidance] = run(algo, task, ref, value, tmp_path / guidance, progress=False)[-1]
    q, cd = results["qsharp"], results["cd"]
    assert q["guided_reward"] > q["ref_reward"] + 0.4
    assert cd["guided_reward"] > cd["ref_reward"] + 0.4
    assert q["guided_kl"] < cd["guided_kl"]


def test_q_type_value_model_with_the_bellman_loss(tmp_path):
    """The driver fits a Q-type model by distributional Bellman backups; guidance then helps."""
    import dataclasses

    algo, task, ref, _ = build()
    cfg = dataclasses.replace(ref.cfg, tie_embeddings=False)
    value = ValueModel(cfg, HeadConfig("categorical", 11, q_type=True), rngs=nnx.Rngs(1))
    algo = dataclasses.replace(algo, loss="categorical_bellman")
    last = run(algo, task, ref, value, tmp_path, progress=False)[-1]
    assert last["guided_reward"] > last["ref_reward"] + 0.1  # measured: 0.27 vs 0.125
    assert np.isfinite(last["fit_loss"]) and np.isfinite(last["fit_explained_variance"])


def test_v_type_value_model_with_the_bellman_loss(tmp_path):
    """V-type Bellman targets over π_ref's top-k: the value of the first (decisive) token's branches
    is bootstrapped from the end of the sequence; guidance then helps."""
    import dataclasses

    algo, task, ref, value = build()
    algo = dataclasses.replace(algo, loss="categorical_bellman")
    last = run(algo, task, ref, value, tmp_path, progress=False)[-1]
    assert last["guided_reward"] > last["ref_reward"] + 0.3  # measured: 0.63 vs 0.10
    assert np.isfinite(last["fit_loss"]) and np.isfinite(last["fit_explained_variance"])


def test_drop_no_variation_fits_only_informative_prompts(tmp_path):
    import dataclasses

    algo, task, ref, value = build()
    algo = dataclasses.replace(algo, iterations=1, drop_no_variation=True)
    first = run(algo, task, ref, value, tmp_path, progress=False)[0]
    data = np.load(tmp_path / "data" / "iteration-00000.npz")
    groups, inverse = np.unique(data["group"], return_inverse=True)
    varied = [np.ptp(data["rewards"][inverse == g]) > 0 for g in range(len(groups))]
    assert first["fit_examples"] == algo.samples_per_prompt * sum(varied) < first["examples"]


def test_driver_on_a_mesh_equals_single_device(tmp_path):
    """π_ref, value model, optimizer state and batches sharded over 8 fake devices. Two epochs: the
    sharded matmuls sum in another order (~1e-7), which 20 epochs of Adam at lr 1e-2 amplify
    chaotically (fit losses 0.24 vs 0.17, measured), so equality is checked where it is exact enough
    to mean something (measured: fit loss equal, explained variance 1e-6 apart)."""
    import dataclasses

    from qsharp_jax import sharding

    def iteration_0(mesh=None):
        algo, task, ref, value = build()
        algo = dataclasses.replace(algo, iterations=1, epochs=2)
        return run(algo, task, ref, value, tmp_path / str(mesh is None), progress=False, mesh=mesh)[0]

    a, b = iteration_0(), iteration_0(sharding.make_mesh(data=2, fsdp=2, tensor=2))
    assert a.keys() == b.keys()
    for key in a:
        if key in ("iteration", "examples", "fit_examples", "ref_reward", "ref_kl", "guided_reward"):
            assert a[key] == b[key], key  # the same tokens sampled
        else:
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-5, err_msg=key)
    assert a["fit_loss"] < 0.8  # the two epochs did fit (1.76 after one)


def test_rollouts_in_chunks_of_rollout_batch(tmp_path):
    """More rows than rollout_batch: every row draws from its own key (its global index), so the
    chunked rollouts equal one call on all rows (the last, short chunk padded and its padding
    dropped); guided and with switch times. That is why rollout_batch may change on resume."""
    import dataclasses

    import jax

    from qsharp_jax import algorithm, rollout

    algo, task, ref, value = build()
    prompts, mask = task.sample_prompts(np.random.default_rng(0), 7)
    switch = np.array([0, 1, 2, 0, 1, 2, 1])
    kw = dict(max_new_tokens=3, top_k=V, value_model=value, guidance="qsharp", eta=0.1)
    key = jax.random.key(5)
    whole = rollout.generate(ref, prompts, mask, key=key, switch_time=switch, **kw)
    for size, slots in ((3, 0), (7, 0), (7, 2), (3, 1)):  # static, and continuous (a queue per call)
        out = algorithm._generate(dataclasses.replace(algo, rollout_batch=size, rollout_slots=slots), ref, prompts,
                                  mask, key, failpoint="test", switch_time=switch, **kw)
        assert out.tokens.shape == (7, 3) and out.kl.shape == (7,)
        np.testing.assert_array_equal(out.tokens, whole.tokens)
        np.testing.assert_array_equal(out.mask, whole.mask)
        for name in ("logprobs", "ref_logprobs", "kl"):
            np.testing.assert_allclose(getattr(out, name), np.asarray(getattr(whole, name)), rtol=1e-5, atol=1e-6,
                                       err_msg=name)
    with pytest.raises(ValueError, match="must be >= 1: rollout_batch=0"):
        dataclasses.replace(algo, rollout_batch=0)
    with pytest.raises(ValueError, match="rollout_slots must be >= 0"):
        dataclasses.replace(algo, rollout_slots=-1)
    # the driver runs with chunked collection and evaluation, static and continuous alike
    algo = dataclasses.replace(algo, rollout_batch=6, iterations=1, epochs=2)
    history = run(algo, task, ref, value, tmp_path / "static", progress=False)
    assert history[-1]["examples"] == algo.prompts_per_iteration * algo.samples_per_prompt
    _, _, _, fresh = build()  # the run consumed its value model's buffers
    continuous = run(dataclasses.replace(algo, rollout_slots=2 * algo.samples_per_prompt), task, ref, fresh,
                     tmp_path / "continuous", progress=False)
    assert continuous[-1].keys() == history[-1].keys()
    for k, v in history[-1].items():
        assert continuous[-1][k] == pytest.approx(v, rel=1e-4, abs=1e-5), k


def test_the_whole_setup_is_checked_before_any_work(tmp_path):
    """A typo in a config choice, atoms that do not cover the task's rewards, a top-k beyond the
    vocabulary or a loss the head cannot fit are refused before the run directory exists."""
    from qsharp_jax import config
    from qsharp_jax.runs import RunConfig, start_or_resume

    with pytest.raises(ValueError, match="algorithm.guidance"):
        config.load(RunConfig, None, ["algorithm.guidance=qsharpp"])
    with pytest.raises(ValueError, match="algorithm.loss"):
        config.load(RunConfig, None, ["algorithm.loss=categorial"])
    with pytest.raises(ValueError, match="unknown task 'planted'"):
        config.load(RunConfig, None, ["task=planted"])
    base = [f"run_dir={tmp_path / 'run'}", "algorithm.top_k=8"]
    cases = [
        (["head.v_max=0.5"], r"rewards lie in \[0, 1\] but the value head's atoms cover \[0, 0.5\]"),
        (["algorithm.top_k=9"], "top_k=9 exceeds π_ref's vocabulary of 8"),
        (["algorithm.loss=mse"], "loss 'mse' does not fit a 'categorical' value head"),
        (["head.kind=bernoulli", "algorithm.loss=bernoulli"], "guidance='qsharp' needs a categorical value head"),
    ]
    for overrides, message in cases:
        with pytest.raises(ValueError, match=message):
            start_or_resume(config.load(RunConfig, None, [*base, *overrides]), progress=False)
        assert not (tmp_path / "run").exists(), overrides


def test_atoms_come_from_the_head(tmp_path):
    """A head on [0, 2]: Algorithm 1 accepts rewards up to 2 (the task says so), the loss fits them
    on the head's atoms, and decoding guides with the same atoms."""
    algo, task, ref, value = build()
    head = HeadConfig("categorical", 11, v_min=0.0, v_max=2.0)
    np.testing.assert_allclose(head.atoms, np.linspace(0, 2, 11), rtol=1e-6)
    value = ValueModel(ref.cfg, head, rngs=nnx.Rngs(1))

    class Doubled(ToyTask):
        def reward(self, prompts, completions, mask):
            return 2.0 * super().reward(prompts, completions, mask)

    import dataclasses

    history = run(dataclasses.replace(algo, iterations=2), Doubled(reward_range=(0.0, 2.0)), ref, value, tmp_path, progress=False)
    assert history[-1]["guided_reward"] > history[-1]["ref_reward"] + 0.5  # rewards are 0 or 2 now
    with pytest.raises(ValueError, match=r"rewards lie in \[0, 2\] but the value head's atoms cover \[0, 1\]"):
        run(algo, Doubled(reward_range=(0.0, 2.0)), ref, ValueModel(ref.cfg, HeadConfig(), rngs=nnx.Rngs(1)), tmp_path / "narrow",
            progress=False)
