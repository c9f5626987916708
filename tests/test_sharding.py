"""Mesh construction and the logical-axis rule table (8 fake CPU devices, see conftest)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from qsharp_jax import sharding
from qsharp_jax.models.transformer import Transformer, TransformerConfig


def test_make_mesh_shapes_and_errors():
    assert dict(sharding.make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(sharding.make_mesh(data=-1, tensor=4).shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    with pytest.raises(ValueError, match="needs 12 devices, have 8"):
        sharding.make_mesh(data=3, fsdp=2, tensor=2)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        sharding.make_mesh(data=-1, fsdp=-1)


def test_rules_map_logical_axes():
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    assert sharding.logical_to_spec(("embed", "heads", "head_dim"), (8, 4, 2), mesh) == P("fsdp", "tensor", None)
    assert sharding.logical_to_spec(("batch", None), (8, 3), mesh) == P(("data", "fsdp"), None)
    # a dimension the mesh does not divide is replicated rather than failing
    assert sharding.logical_to_spec(("vocab", "embed"), (61, 8), mesh) == P(None, "fsdp")
    # a mesh axis is used once per array
    assert sharding.logical_to_spec(("mlp", "heads"), (4, 4), mesh) == P("tensor", None)
    custom = (("vocab", ("tensor", "fsdp")),)
    assert sharding.logical_to_spec(("vocab",), (64,), mesh, custom) == P(("tensor", "fsdp"))
    with pytest.raises(ValueError, match="logical axis 'nope' has no sharding rule"):
        sharding.logical_to_spec(("nope",), (4,), mesh)


def test_jitted_forward_with_sharded_params_equals_single_device():
    cfg = TransformerConfig(vocab_size=32, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4,
                            mlp_dim=32, max_positions=64)
    from flax import nnx

    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    placed = jax.device_put(state, sharding.state_shardings(state, mesh))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 32, size=(4, 8)), jnp.int32)
    ids = jax.device_put(ids, sharding.batch_sharding(mesh, 2))
    out = jax.jit(lambda s, i: nnx.merge(graphdef, s)(i))(placed, ids)
    assert placed["layers"][0]["q"][...].sharding.spec == P("tensor", None, "fsdp")
    np.testing.assert_allclose(out, model(ids), atol=1e-5)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(num_heads=3), "multiple of num_kv_heads"),
        (dict(activation="tanh"), "unsupported activation 'tanh'"),
        (dict(rope_scaling=(("rope_type", "yarn"),)), "unsupported rope scaling 'yarn'"),
        (dict(head_dim=5), "even head_dim"),
    ],
)
def test_config_errors(overrides, message):
    base = dict(vocab_size=32, hidden_size=16, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=4, mlp_dim=8,
                max_positions=16)
    with pytest.raises(ValueError, match=message):
        TransformerConfig(**(base | overrides))


def test_cache_and_length_errors():
    from flax import nnx

    cfg = TransformerConfig(vocab_size=32, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                            mlp_dim=8, max_positions=8, positions="learned", norm="layernorm", mlp="gelu",
                            activation="gelu_new")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="sequence length 9 exceeds the model's max_positions=8"):
        model(jnp.zeros((1, 9), jnp.int32))
    with pytest.raises(ValueError, match="cache max_len=9 exceeds"):
        model.init_cache(1, 9)
    cache = model.init_cache(1, 4)
    _, cache = model.extend(jnp.zeros((1, 3), jnp.int32), cache)
    with pytest.raises(ValueError, match="cache overflow: writing 2 tokens at slot 3 of a cache with max_len=4"):
        model.extend(jnp.zeros((1, 2), jnp.int32), cache)
    # under jit the overflow poisons the output with NaN instead of silently overwriting slots
    logits, _ = jax.jit(lambda m, i, c: m.extend(i, c))(model, jnp.zeros((1, 2), jnp.int32), cache)
    assert np.all(np.isnan(logits))
    logits, _ = jax.jit(lambda m, i, c: m.extend(i, c))(model, jnp.zeros((1, 1), jnp.int32), cache)
    assert np.all(np.isfinite(logits))  # the last slot still fits
    with pytest.raises(AssertionError, match="input_ids must be \\[batch, time\\]"):
        model(jnp.zeros((3,), jnp.int32))
    with pytest.raises(AssertionError, match="attention_mask must have the shape of input_ids"):
        model(jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 4), bool))


def test_a_global_array_from_the_process_rows_equals_the_placed_one():
    # one process holds every row; on a pod each host passes its own (tests/test_multihost.py)
    mesh = sharding.make_mesh(4, 2, 1)
    rows = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
    for x in (rows, rows[:, 0]):
        spec = sharding.batch_sharding(mesh, x.ndim)
        built, placed = sharding.from_process_rows(x, spec, 16), sharding.put(x, spec)
        assert built.sharding == placed.sharding and built.shape == x.shape
        np.testing.assert_array_equal(np.asarray(built), x)
        assert [s.index for s in built.addressable_shards] == [s.index for s in placed.addressable_shards]
