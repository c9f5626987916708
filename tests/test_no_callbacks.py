"""No host callbacks in the compiled hot loops: the decoding loop (plain and guided, V- and
Q-type, every guidance) and the train steps of every value loss. η, the atoms and top-k are
validated once at the public boundary; a value check on a traced value inside the loop would be a
host round trip per decoded token or per step.

Guards against: calling the checked public offsets (``guidance.qsharp_logit_offset`` & co.) inside
``rollout._generate`` with traced η / atoms, and range-checking traced returns inside the train step
(``losses.*`` without ``clip=True``); each leaves a ``debug_callback`` in the jaxpr."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qsharp_jax import objectives
from qsharp_jax.models.transformer import Transformer, TransformerConfig
from qsharp_jax.models.value import HeadConfig, ValueModel
from qsharp_jax.rollout import generate
from qsharp_jax.train import OptimizerConfig, init_state, make_optimizer, make_train_epoch

V = 8
CFG = TransformerConfig(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                        mlp_dim=16, max_positions=16)


def callbacks_in(jaxpr) -> list[str]:
    return [line.strip() for line in str(jaxpr).splitlines() if "callback" in line]


def compiled_loop(jaxpr, name: str = "_generate"):
    """The jaxpr of the jitted ``rollout._generate`` (continuous batching: ``_generate_continuous``)
    inside a traced ``generate`` call (the checks at the public boundary around it run on concrete
    values, outside it)."""
    inner = [e.params["jaxpr"] for e in jaxpr.jaxpr.eqns if e.params.get("name") == name]
    assert len(inner) == 1
    return inner[0]


@pytest.mark.parametrize("guidance,kind,q_type", [
    (None, None, False), ("qsharp", "categorical", False), ("cd", "categorical", False),
    ("qsharp", "categorical", True), ("bernoulli", "bernoulli", False), ("bernoulli", "bernoulli", True),
])
@pytest.mark.parametrize("continuous", [False, True])
def test_decoding_loop_has_no_callback(guidance, kind, q_type, continuous):
    ref = Transformer(CFG, rngs=nnx.Rngs(0))
    value = None if guidance is None else ValueModel(CFG, HeadConfig(kind, 5, q_type=q_type), rngs=nnx.Rngs(1))
    ids, mask = jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3), bool)
    switch = jnp.array([1, 3])
    batching = dict(slots=1, refill=1) if continuous else {}
    jaxpr = jax.make_jaxpr(lambda: generate(
        ref, ids, mask, key=jax.random.key(0), max_new_tokens=3, value_model=value, guidance=guidance, eta=0.1,
        top_k=4, top_p=0.9, temperature=0.7, switch_time=switch, eos_id=7, **batching))()
    loop = compiled_loop(jaxpr, "_generate_continuous" if continuous else "_generate")
    assert "while" in str(loop)  # the loop itself was traced
    assert callbacks_in(loop) == []


@pytest.mark.parametrize("loss,kind,q_type", [
    ("categorical", "categorical", False), ("categorical", "categorical", True), ("bernoulli", "bernoulli", False),
    ("mse", "scalar", False), ("categorical_bellman", "categorical", False),
    ("categorical_bellman", "categorical", True),
])
def test_train_step_has_no_callback(loss, kind, q_type):
    value = ValueModel(CFG, HeadConfig(kind, 5, q_type=q_type), rngs=nnx.Rngs(1))
    optimizer = make_optimizer(OptimizerConfig())
    state = init_state(value, optimizer, jax.random.key(0))
    n, t = 4, 5
    batch = {"tokens": jnp.ones((n, t), jnp.int32), "attention_mask": jnp.ones((n, t), bool),
             "loss_mask": jnp.ones((n, t), bool), "rewards": jnp.asarray(np.linspace(0, 1, n), jnp.float32)}
    if loss == "categorical_bellman":
        ref = Transformer(CFG, rngs=nnx.Rngs(0))
        graph, ref_state = nnx.split(ref)
        top_k = None if q_type else 3

        def prepare(extra, b):
            return {**b, **objectives.reference_inputs(nnx.merge(graph, extra), b["tokens"], b["attention_mask"],
                                                       top_k=top_k)}

        epoch = make_train_epoch(objectives.bellman_value_loss, optimizer, prepare=prepare)
        jaxpr = jax.make_jaxpr(epoch.step)(state, batch, ref_state)
    else:
        epoch = make_train_epoch(lambda m, b: objectives.value_loss(m, b, kind=loss), optimizer)
        jaxpr = jax.make_jaxpr(epoch.step)(state, batch)
    assert "dot_general" in str(jaxpr)  # the model and its gradient were traced
    assert callbacks_in(jaxpr) == []

