"""Value-model training: schedules, the Monte-Carlo value losses, the jitted step, sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsharp_jax import losses, sharding
from qsharp_jax.models import flash
from qsharp_jax.models.transformer import Transformer, TransformerConfig
from qsharp_jax.models.value import HeadConfig, ValueModel
from qsharp_jax.objectives import bellman_value_loss, reference_inputs, value_loss
from qsharp_jax.train import (
    OptimizerConfig,
    init_state,
    learning_rate_schedule,
    make_optimizer,
    make_train_epoch,
    make_train_step,
    state_shardings,
)

V = 10
CFG = TransformerConfig(vocab_size=V, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8,
                        mlp_dim=32, max_positions=32)


def toy_batch(n=16, t=6, seed=0):
    """Reward 1 iff token 3 (the first response token) is 7; the loss covers the response."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, size=(n, t))
    tokens[: n // 2, 3] = 7
    attention = np.ones((n, t), bool)
    attention[0, :2] = False  # some left padding
    loss_mask = np.zeros((n, t), bool)
    loss_mask[:, 3:] = True
    rewards = (tokens[:, 3] == 7).astype(np.float32)
    return {"tokens": jnp.asarray(tokens, jnp.int32), "attention_mask": jnp.asarray(attention),
            "loss_mask": jnp.asarray(loss_mask), "rewards": jnp.asarray(rewards)}


def test_schedule_warmup_then_cosine():
    cfg = OptimizerConfig(learning_rate=1e-3, warmup_steps=10, decay_steps=100, schedule="cosine")
    lr = learning_rate_schedule(cfg)
    np.testing.assert_allclose([lr(0), lr(5), lr(10)], [0.0, 5e-4, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(lr(60), 1e-3 * 0.5 * (1 + np.cos(np.pi * 0.5)), rtol=1e-5)
    np.testing.assert_allclose(lr(110), 0.0, atol=1e-9)
    assert learning_rate_schedule(OptimizerConfig(learning_rate=3e-4))(1000) == pytest.approx(3e-4)


@pytest.mark.parametrize("q_type", [False, True])
def test_value_loss_matches_manual(q_type):
    model = ValueModel(CFG, HeadConfig("categorical", 5, q_type=q_type), rngs=nnx.Rngs(0))
    batch = toy_batch()
    loss, metrics = jax.jit(value_loss)(model, batch)
    out = np.asarray(jax.jit(model)(batch["tokens"], batch["attention_mask"]))
    mask = np.asarray(batch["loss_mask"] & batch["attention_mask"])
    tokens = np.asarray(batch["tokens"])
    if q_type:  # value of the prefix ending at t sits at t-1, indexed by token t
        n, t = tokens.shape
        out = out[np.arange(n)[:, None], np.arange(t - 1)[None], tokens[:, 1:]]
        mask = mask[:, 1:]
    returns = np.broadcast_to(np.asarray(batch["rewards"])[:, None], mask.shape)
    expected = losses.categorical_return_loss(jnp.asarray(out), jnp.asarray(returns), jnp.linspace(0, 1, 5),
                                              jnp.asarray(mask))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert metrics["fitted_tokens"] == mask.sum()


@pytest.mark.parametrize("q_type", [False, True])
def test_value_loss_with_a_target_per_prefix(q_type):
    """``returns [N, T]`` instead of ``rewards [N]``: each fitted prefix has its own target."""
    model = ValueModel(CFG, HeadConfig("categorical", 5, q_type=q_type), rngs=nnx.Rngs(0))
    batch = toy_batch()
    per_prefix = np.random.default_rng(1).random(batch["tokens"].shape).astype(np.float32)
    loss, metrics = jax.jit(value_loss)(model, {k: v for k, v in batch.items() if k != "rewards"} | {"returns": per_prefix})
    out = np.asarray(jax.jit(model)(batch["tokens"], batch["attention_mask"]))
    mask = np.asarray(batch["loss_mask"] & batch["attention_mask"])
    tokens, returns = np.asarray(batch["tokens"]), per_prefix
    if q_type:  # the prefix ending at t is read at t-1, indexed by token t
        n, t = tokens.shape
        out = out[np.arange(n)[:, None], np.arange(t - 1)[None], tokens[:, 1:]]
        mask, returns = mask[:, 1:], returns[:, 1:]
    expected = losses.categorical_return_loss(jnp.asarray(out), jnp.asarray(returns), jnp.linspace(0, 1, 5),
                                              jnp.asarray(mask))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    assert metrics["fitted_tokens"] == mask.sum()
    with pytest.raises(AssertionError, match=r"batch\['returns'\] must be \[N, T\]"):
        value_loss(model, {**batch, "returns": per_prefix[:, :-1]})


@pytest.mark.parametrize("kind,head", [("categorical", "categorical"), ("bernoulli", "bernoulli"), ("mse", "scalar")])
def test_train_step_learns_the_planted_reward(kind, head):
    model = ValueModel(CFG, HeadConfig(head, 11), rngs=nnx.Rngs(1))
    optimizer = make_optimizer(OptimizerConfig(learning_rate=3e-3, weight_decay=0.0))
    state = init_state(model, optimizer, jax.random.key(0))
    step = make_train_step(lambda m, b: value_loss(m, b, kind=kind), optimizer)
    batch = toy_batch(n=32)
    first = None
    for _ in range(150):
        state, metrics = step(state, batch)
        first = metrics["loss"] if first is None else first
    assert metrics["loss"] < 0.5 * first
    assert metrics["explained_variance"] > 0.9
    assert int(state.step) == 150


@pytest.mark.parametrize("kernel", ["xla", "pallas"])
def test_sharded_step_equals_single_device(monkeypatch, kernel):
    """And with a Pallas attention kernel (a GPU faked, the kernel interpreted), which the sharded
    step splits over the mesh itself, against XLA attention on one device."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=2, decay_steps=10))
    loss_fn = lambda m, b: value_loss(m, b)  # noqa: E731
    batch = toy_batch(n=8)
    kernels = []
    if kernel == "pallas":
        pallas = flash._pallas
        monkeypatch.setattr(flash, "_platform", lambda: "gpu")
        monkeypatch.setattr(flash, "_pallas", lambda *a, **k: kernels.append(k["kernel"]) or pallas(*a, **k))

    def run(mesh):
        model = ValueModel(CFG, HeadConfig(), rngs=nnx.Rngs(2))
        if mesh is not None:
            model.backbone.cfg = dataclasses.replace(CFG, attention_kernel=kernel)
        state = init_state(model, optimizer, jax.random.key(0))
        if mesh is not None:
            state = jax.device_put(state, state_shardings(state, mesh))
        step = make_train_step(loss_fn, optimizer, mesh, state)
        for _ in range(3):
            state, metrics = step(state, batch)
        return state, metrics

    single, m1 = run(None)
    sharded, m2 = run(mesh)
    q = sharded.params["backbone"]["layers"][0]["q"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("tensor", None, "fsdp")
    mu = sharded.opt_state[1][0].mu["backbone"]["layers"][0]["q"]  # clip -> adamw: slots follow params
    assert mu.sharding.spec == q.sharding.spec
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(sharded.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    assert kernels == (["pallas_gpu"] * CFG.num_layers if kernel == "pallas" else [])


@pytest.mark.parametrize("on_mesh", [False, True])
def test_scanned_epoch_equals_steps_one_at_a_time(on_mesh):
    """make_train_epoch = make_train_step applied batch by batch (sharded or not), with its
    ``prepare`` hook run inside each step on that step's batch and the ``extra`` argument."""
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2, warmup_steps=2, decay_steps=10))
    loss_fn = lambda m, b: value_loss(m, b)  # noqa: E731
    batches = [toy_batch(n=8, seed=s) for s in range(4)]
    fresh = lambda: init_state(ValueModel(CFG, HeadConfig(), rngs=nnx.Rngs(2)), optimizer, jax.random.key(0))  # noqa: E731

    def flip(extra, batch):  # a hook that changes what is fitted: rewards become extra - rewards
        return {**batch, "rewards": extra - batch["rewards"]}

    step = make_train_step(lambda m, b: loss_fn(m, flip(1.0, b)), optimizer)
    expected, per_step = fresh(), []
    for batch in batches:
        expected, metrics = step(expected, batch)
        per_step.append(metrics["loss"])

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2) if on_mesh else None
    state = fresh()
    if mesh is not None:
        state = jax.device_put(state, state_shardings(state, mesh))
    epoch = make_train_epoch(loss_fn, optimizer, mesh, state, prepare=flip)
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)  # [S, B, ...]
    state, metrics = epoch(state, stacked, jnp.float32(1.0))
    assert metrics["loss"].shape == (4,) and int(state.step) == 4
    np.testing.assert_allclose(metrics["loss"], per_step, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(expected.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)
    if mesh is not None:
        q = state.params["backbone"]["layers"][0]["q"]
        assert q.sharding.spec == jax.sharding.PartitionSpec("tensor", None, "fsdp")


def test_a_fit_compiles_its_step_once():
    """A fit calls the train epoch chunk after chunk with the state the last call returned: a fresh
    state must look like that one to jit (committed leaves), or the second chunk compiles again."""
    from jax._src.dispatch import BACKEND_COMPILE_EVENT, JAXPR_TO_MLIR_MODULE_EVENT

    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2))
    model = ValueModel(CFG, HeadConfig(), rngs=nnx.Rngs(2))
    nnx.update(model, jax.device_put(nnx.state(model), jax.devices()[0]))  # as loaded weights are: committed
    state = init_state(model, optimizer, jax.random.key(0))
    epoch = make_train_epoch(value_loss, optimizer)
    chunk = jax.tree.map(lambda *xs: jnp.stack(xs), *[toy_batch(n=8, seed=s) for s in range(2)])
    compiles = []
    watched = (JAXPR_TO_MLIR_MODULE_EVENT, BACKEND_COMPILE_EVENT)  # lowering: also where the compilation cache hits
    listener = lambda event, seconds, **_: compiles.append(event) if event in watched else None  # noqa: E731
    state, _ = epoch(state, chunk)  # the first chunk compiles
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        for _ in range(2):
            state, metrics = epoch(state, chunk)
            jax.block_until_ready(metrics["loss"])
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [] and int(state.step) == 6


def test_a_consumed_model_still_serves_as_a_restore_template():
    """After a fit donated a model's buffers, init_state of it gives the shapes a restore needs."""
    model = ValueModel(CFG, HeadConfig(), rngs=nnx.Rngs(2))  # fresh: uncommitted parameters
    for x in jax.tree.leaves(nnx.state(model)):
        x.delete()
    state = init_state(model, make_optimizer(OptimizerConfig()), jax.random.key(0))
    assert state.step.committed and jax.tree.leaves(state.params)[0].is_deleted()


def test_loss_kind_must_fit_the_head():
    model = ValueModel(CFG, HeadConfig("scalar"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="loss 'categorical' does not fit a 'scalar' value head"):
        value_loss(model, toy_batch(), kind="categorical")


def test_bellman_loss_matches_manual_targets():
    model = ValueModel(CFG, HeadConfig("categorical", 5, q_type=True), rngs=nnx.Rngs(3))
    batch = toy_batch(n=4)
    rng = np.random.default_rng(1)
    batch["ref_logits"] = jnp.asarray(rng.normal(size=(*batch["tokens"].shape, V)), jnp.float32)
    loss, _ = jax.jit(bellman_value_loss)(model, batch)
    out = np.asarray(jax.jit(model)(batch["tokens"], batch["attention_mask"]), np.float64)
    tokens, attention = np.asarray(batch["tokens"]), np.asarray(batch["attention_mask"])
    atoms = np.linspace(0, 1, 5)
    total, count = 0.0, 0
    for n in range(4):
        last = np.flatnonzero(attention[n]).max()
        for t in range(tokens.shape[1] - 1):
            if not (batch["loss_mask"][n, t + 1] and attention[n, t + 1]):
                continue
            logits = out[n, t, tokens[n, t + 1]]
            if t + 1 == last:
                target = np.zeros(5)
                target[np.argmin(np.abs(atoms - float(batch["rewards"][n])))] = 1.0  # rewards sit on atoms
            else:
                ref = np.exp(batch["ref_logits"][n, t + 1]) / np.exp(batch["ref_logits"][n, t + 1]).sum()
                own = np.exp(out[n, t + 1]) / np.exp(out[n, t + 1]).sum(-1, keepdims=True)
                target = ref @ own
            log_p = logits - np.log(np.exp(logits).sum())
            total += -(target * log_p).sum()
            count += 1
    np.testing.assert_allclose(loss, total / count, rtol=1e-5)
    # the target is a constant: only the chosen entries get gradient
    grads = jax.jit(jax.grad(lambda p: bellman_value_loss(nnx.merge(*nnx.split(model)[:1], p), batch)[0]))(
        nnx.split(model)[1])
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="needs a categorical value head"):
        bellman_value_loss(ValueModel(CFG, HeadConfig("bernoulli", q_type=True), rngs=nnx.Rngs(0)), batch)


def context_sensitive(model, seed=0, scale=0.4):
    """The same model with large random weights, so every output depends visibly on every token
    (at the 0.02 init scale a wrong attention mask moves outputs by less than the tolerances)."""
    graphdef, params = nnx.split(model)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return nnx.merge(graphdef, jax.tree.unflatten(
        tree, [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]))


def test_v_type_bellman_loss_matches_brute_force():
    """Targets: π_ref's top-k next tokens, renormalized, mixing the model's values of each extended
    prefix — each computed here by a separate forward of the whole extended sequence."""
    model = context_sensitive(ValueModel(CFG, HeadConfig("categorical", 5), rngs=nnx.Rngs(4)))
    ref = Transformer(CFG, rngs=nnx.Rngs(5))
    batch = toy_batch(n=4)
    k = 3
    batch.update(jax.jit(reference_inputs, static_argnames="top_k")(ref, batch["tokens"], batch["attention_mask"],
                                                                   top_k=k))
    loss, _ = jax.jit(bellman_value_loss)(model, batch)
    tokens, attention = np.asarray(batch["tokens"]), np.asarray(batch["attention_mask"])
    ref_logits = np.asarray(jax.jit(ref)(batch["tokens"], batch["attention_mask"]), np.float64)
    atoms = np.linspace(0, 1, 5)
    softmax = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)  # noqa: E731
    # brute force: each prefix and each of its top-k extensions as its own right-padded sequence
    seqs = []
    for n in range(4):
        real = tokens[n][attention[n]]
        offset = int((~attention[n]).sum())
        for t in range(tokens.shape[1]):
            if batch["loss_mask"][n, t] and attention[n, t]:
                prefix = real[: t - offset + 1]
                top = np.argsort(-ref_logits[n, t])[:k]
                seqs.append((n, t, prefix, top, [prefix] + [np.append(prefix, c) for c in top]))
    flat = [s for *_, group in seqs for s in group]
    padded = np.zeros((len(flat), tokens.shape[1] + 1), np.int32)
    real_mask = np.zeros(padded.shape, bool)
    for i, s in enumerate(flat):
        padded[i, : len(s)], real_mask[i, : len(s)] = s, True
    out = np.asarray(jax.jit(model)(jnp.asarray(padded), jnp.asarray(real_mask)), np.float64)
    value = lambda i: out[i, len(flat[i]) - 1]  # noqa: E731
    total, i = 0.0, 0
    for n, t, prefix, top, group in seqs:
        logits = value(i)
        if t == tokens.shape[1] - 1:
            target = np.zeros(5)
            target[np.argmin(np.abs(atoms - float(batch["rewards"][n])))] = 1.0
        else:
            own = softmax(np.stack([value(i + 1 + j) for j in range(k)]))
            target = softmax(ref_logits[n, t, top]) @ own
        total += -(target * np.log(softmax(logits))).sum()
        i += len(group)
    np.testing.assert_allclose(loss, total / len(seqs), rtol=1e-4)
    with pytest.raises(ValueError, match="needs 'ref_top_ids' and 'ref_top_logits'"):
        bellman_value_loss(model, toy_batch(n=4))


def test_v_type_bellman_gradient_skips_the_targets():
    """Semi-gradient: the loss's gradient equals that of the same loss with the targets frozen."""
    model = ValueModel(CFG, HeadConfig("categorical", 5), rngs=nnx.Rngs(6))
    ref = Transformer(CFG, rngs=nnx.Rngs(7))
    batch = toy_batch(n=4)
    batch.update(jax.jit(reference_inputs, static_argnames="top_k")(ref, batch["tokens"], batch["attention_mask"],
                                                                   top_k=3))
    graphdef, params = nnx.split(model)
    _, branches = jax.jit(model.score_branches)(batch["tokens"], batch["attention_mask"], batch["ref_top_ids"])
    frozen = jax.nn.softmax(branches, axis=-1)

    def with_frozen(p):
        m = nnx.merge(graphdef, p)
        chosen = m(batch["tokens"], batch["attention_mask"])
        ref_w = jax.nn.softmax(batch["ref_top_logits"], axis=-1)
        nxt = jnp.einsum("ntj,ntjk->ntk", ref_w, frozen)
        terminal = jnp.broadcast_to(jnp.arange(6)[None, :] == 5, (4, 6))  # every row ends at t = 5
        return losses.categorical_bellman_loss(
            chosen, nxt, jnp.where(terminal, batch["rewards"][:, None], 0.0), jnp.where(terminal, 0.0, 1.0),
            jnp.linspace(0, 1, 5), batch["loss_mask"] & batch["attention_mask"])

    got = jax.jit(jax.grad(lambda p: bellman_value_loss(nnx.merge(graphdef, p), batch)[0]))(params)
    want = jax.jit(jax.grad(with_frozen))(params)  # jitted: eager dispatch of these graphs takes half a minute
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_next_token_training_matches_pytorch(tmp_path, kind):
    """The whole training path (forward, masked next-token loss, gradients, global-norm clipping,
    AdamW with decoupled weight decay, warmup + cosine schedule) against Hugging Face PyTorch with
    torch.optim.AdamW from the same weights on the same batches, step for step."""
    import torch
    import transformers

    from hf_fixtures import make_checkpoint
    from qsharp_jax import objectives as policy
    from qsharp_jax.models import from_hf

    make_checkpoint(kind, tmp_path)
    with torch.no_grad():  # small weights: a well-conditioned trajectory, so 1e-4 is a fair tolerance
        reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float()
        for p in reference.parameters():
            if p.ndim > 1:
                p.mul_(0.1)
    reference.save_pretrained(tmp_path)
    cfg = OptimizerConfig(learning_rate=3e-3, weight_decay=0.1, warmup_steps=3, decay_steps=9, clip_norm=0.5,
                          end_learning_rate=3e-4)
    optimizer = make_optimizer(cfg)
    state = init_state(from_hf(tmp_path), optimizer, jax.random.key(0))
    step = make_train_step(policy.next_token_loss, optimizer)
    torch_opt = torch.optim.AdamW(reference.parameters(), lr=1.0, betas=(cfg.b1, cfg.b2), eps=1e-8,
                                  weight_decay=cfg.weight_decay)
    schedule = learning_rate_schedule(cfg)
    rng = np.random.default_rng(1)
    reference.eval()  # no dropout (GPT-2's config has 0.1); gradients flow all the same
    losses_jax, losses_torch = [], []
    data = rng.integers(0, 61, size=(3, 4, 20)), rng.random((3, 4, 20)) < 0.6  # three batches, cycled
    for i in range(12):
        tokens, loss_mask = data[0][i % 3], data[1][i % 3]
        state, metrics = step(state, {"tokens": jnp.asarray(tokens, jnp.int32),
                                      "attention_mask": jnp.ones((4, 20), bool), "loss_mask": jnp.asarray(loss_mask)})
        losses_jax.append(float(metrics["loss"]))
        for group in torch_opt.param_groups:
            group["lr"] = float(schedule(i))
        ids, target = torch.tensor(tokens), torch.tensor(loss_mask[:, 1:])
        logits = reference(input_ids=ids).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[target], ids[:, 1:][target])
        torch_opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.clip_norm)
        torch_opt.step()
        losses_torch.append(loss.item())
    np.testing.assert_allclose(losses_jax, losses_torch, rtol=1e-4)
    assert losses_jax[-1] < losses_jax[0] - 0.05  # it trained: the comparison is not of a frozen model
    # the trained weights: same logits on fresh tokens
    ids = rng.integers(0, 61, size=(2, 20))
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(jax.jit(state.model())(jnp.asarray(ids, jnp.int32)), expected, atol=2e-4, rtol=1e-3)
