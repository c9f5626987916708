"""Fused attention kernels (``models.flash``): the Pallas TPU and GPU flash kernels, run here in
Pallas' interpreter, and the cuDNN call (checked through the same ``jax.nn.dot_product_attention``
call with XLA's implementation) give XLA attention's outputs and gradients at real tokens, in a
bare attention and in a whole model's fit; each platform gets the kernel it has, and a kernel a
platform lacks is refused."""

import contextlib
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.experimental.pallas import tpu as pltpu

from qsharp_jax import sharding
from qsharp_jax.models import flash
from qsharp_jax.models.build import ModelSpec, build_value
from qsharp_jax.models.transformer import Transformer, TransformerConfig, attention
from qsharp_jax.models.value import HeadConfig

B, T, H, K, D = 2, 20, 4, 2, 8


def _inputs(seed=0):
    q, k, v = (jax.random.normal(key, (B, T, h, D)) for key, h in zip(jax.random.split(jax.random.key(seed), 3),
                                                                        (H, K, K)))
    # row 0: left padding then one sequence; row 1: three packed sequences, then padding
    segments = jnp.array([[0] * 5 + [1] * 15, [1] * 6 + [2] * 9 + [3] * 3 + [0] * 2], jnp.int32)
    allowed = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0) & jnp.tril(
        jnp.ones((T, T), bool))
    return q, k, v, segments, allowed


def _xla(q, k, v, allowed):
    return attention(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), allowed)


@pytest.mark.parametrize("kernel", ["pallas_tpu", "pallas_gpu", "cudnn call"])
def test_a_kernel_equals_xla_attention_and_its_gradients(kernel):
    with interpreted(kernel):
        _kernel_equals_xla(kernel)


@contextlib.contextmanager
def interpreted(kernel):
    """The TPU kernel runs on a CPU in Pallas' TPU interpreter (the GPU one takes ``interpret``).

    The interpreter keeps one simulated memory per process behind one lock, and a CI run hung in
    it (a thread waiting on that lock in a kernel of the fit's backward pass); inside one compiled
    program XLA may run independent kernels (a backward pass's dq and dkv) side by side. So here
    every operation runs on its own, after the previous one has finished."""
    if "tpu" not in kernel:
        yield
        return
    async_dispatch = jax.config.values["jax_cpu_enable_async_dispatch"]
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    try:
        with pltpu.force_tpu_interpret_mode(), jax.disable_jit():
            yield
    finally:
        jax.config.update("jax_cpu_enable_async_dispatch", async_dispatch)


def _kernel_equals_xla(kernel):
    q, k, v, segments, allowed = _inputs()
    real = (segments > 0)[:, :, None, None]
    weights = jax.random.normal(jax.random.key(9), (B, T, H, D))

    def loss(fn, q, k, v):  # a weighted sum over real tokens: padding's states are meaningless
        return jnp.sum(jnp.where(real, fn(q, k, v) * weights, 0.0))

    if kernel == "cudnn call":
        fused = lambda q, k, v: flash.dot_product(q, k, v, allowed | jnp.eye(T, dtype=bool), "xla")  # noqa: E731
    else:
        fused = lambda q, k, v: flash.fused_attention(q, k, v, allowed, segments, kernel)  # noqa: E731
    xla = lambda q, k, v: _xla(q, k, v, allowed)  # noqa: E731
    got, want = fused(q, k, v), xla(q, k, v)
    assert got.shape == want.shape == (B, T, H, D)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), rtol=2e-5, atol=2e-5)
    grads = jax.grad(lambda *a: loss(fused, *a), argnums=(0, 1, 2))(q, k, v)
    expected = jax.grad(lambda *a: loss(xla, *a), argnums=(0, 1, 2))(q, k, v)
    for name, g, e in zip("qkv", grads, expected):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-4, err_msg=name)


def test_a_kernel_splits_itself_over_the_mesh_in_context():
    """Inputs sharded over data x fsdp (rows) and tensor (heads) of 8 devices: each device runs the
    kernel on its part (shard_map), and the result is XLA attention's. The split is the same for
    both kernels; the GPU one is run (the TPU interpreter stalls across 8 host devices)."""
    kernel = "pallas_gpu"
    q, k, v, segments, allowed = _inputs()
    q, k, v, segments, allowed = (jnp.tile(x, (4,) + (1,) * (x.ndim - 1)) for x in (q, k, v, segments, allowed))
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    fused = jax.jit(lambda q, k, v: flash.fused_attention(q, k, v, allowed, segments, kernel))
    with interpreted(kernel), jax.set_mesh(mesh):
        got = fused(*(jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
            ("data", "fsdp"), None, "tensor"))) for x in (q, k, v)))
        assert "shard_map" in str(jax.make_jaxpr(fused)(q, k, v))
    real = (segments > 0)[:, :, None, None]
    np.testing.assert_allclose(np.where(real, got, 0), np.where(real, _xla(q, k, v, allowed), 0), rtol=2e-5,
                               atol=2e-5)


CFG = TransformerConfig(vocab_size=16, hidden_size=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=4,
                        mlp_dim=32, max_positions=64, token_shift=1)


@pytest.mark.parametrize("platform", ["tpu", "gpu"])
def test_a_fit_on_an_accelerator_equals_xla(monkeypatch, platform):
    """A model's loss and parameter gradients over left-padded and packed rows with
    ``attention_kernel='pallas'`` (the platform faked, the kernel interpreted) equal XLA's."""
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, 16, (B, T)), jnp.int32)
    mask = jnp.asarray(np.arange(T)[None] >= np.array([[5], [0]]))  # row 0 left-padded
    packed = jnp.asarray([[0] * 20, [1] * 7 + [2] * 13], jnp.int32)  # row 1: two sequences

    def loss(model, segment_ids):
        logits = model(ids, mask, segment_ids)
        return jnp.sum(jnp.where(mask[:, :, None], jax.nn.log_softmax(logits) * 0.1, 0.0))

    graphdef, state = nnx.split(model)
    monkeypatch.setattr(flash, "_platform", lambda: platform)
    results = {}
    for kernel in ("xla", "pallas"):
        run = nnx.merge(graphdef, state)
        run.cfg = dataclasses.replace(CFG, attention_kernel=kernel)
        for segment_ids in (None, packed):
            with interpreted(platform):
                results[kernel, segment_ids is None] = nnx.value_and_grad(loss)(run, segment_ids)
    for padded in (True, False):
        (got, got_grads), (want, want_grads) = results["pallas", padded], results["xla", padded]
        np.testing.assert_allclose(got, want, rtol=1e-5)
        for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_each_platform_gets_its_kernel():
    choose = flash.choose
    table = {  # (setting, platform, dtype, head_dim, segments suffice) -> kernel
        ("auto", "cpu", jnp.float32, 64, True): "xla",
        ("auto", "cpu", jnp.bfloat16, 64, True): "xla",
        ("auto", "tpu", jnp.bfloat16, 64, True): "pallas_tpu",
        ("auto", "tpu", jnp.bfloat16, 64, False): "xla",  # shared-prompt branches: no segment form
        ("auto", "gpu", jnp.bfloat16, 64, True): "pallas_gpu",
        ("auto", "gpu", jnp.bfloat16, 128, False): "cudnn",  # cuDNN takes any mask
        ("auto", "gpu", jnp.bfloat16, 12, False): "xla",  # but not a head dimension off a multiple of 8
        ("auto", "gpu", jnp.float32, 64, True): "pallas_gpu",
        ("auto", "gpu", jnp.float32, 64, False): "xla",  # cuDNN's flash kernel is half precision only
        ("xla", "tpu", jnp.bfloat16, 64, True): "xla",
        ("pallas", "gpu", jnp.bfloat16, 64, True): "pallas_gpu",
        ("cudnn", "gpu", jnp.float16, 64, True): "cudnn",
    }
    with jax.set_mesh(sharding.make_mesh(data=8)):
        for (setting, platform, dtype, head_dim, suffice), kernel in table.items():
            got = choose(setting, dtype, head_dim, segments_suffice=suffice, platform=platform)
            assert got == kernel, (setting, platform, dtype, head_dim, suffice)
    # several devices and no mesh in context: the inputs may be sharded, which XLA cannot split a
    # Pallas call over (cuDNN's call it can)
    assert choose("auto", jnp.bfloat16, 64, segments_suffice=True, platform="tpu") == "xla"
    assert choose("auto", jnp.bfloat16, 64, segments_suffice=True, platform="gpu") == "cudnn"
    with pytest.raises(ValueError, match="'cudnn' needs a GPU and a bfloat16/float16 model; this is cpu"):
        choose("cudnn", jnp.bfloat16, 64, segments_suffice=True, platform="cpu")
    with pytest.raises(ValueError, match="this is gpu with float32"):
        choose("cudnn", jnp.float32, 64, segments_suffice=True, platform="gpu")
    with pytest.raises(ValueError, match="'pallas' runs on TPU or GPU; this is cpu"):
        choose("pallas", jnp.float32, 64, segments_suffice=True, platform="cpu")


def test_a_sequence_is_a_run_of_one_id():
    """An id seen again after another is another sequence (what its positions already said), for
    XLA as for the kernels' segment ordinals."""
    model = Transformer(CFG, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(3).integers(0, 16, (1, 6)), jnp.int32)
    again = model.hidden(ids, None, jnp.asarray([[1, 1, 2, 2, 1, 1]]))
    np.testing.assert_allclose(again, model.hidden(ids, None, jnp.asarray([[1, 1, 2, 2, 3, 3]])), rtol=1e-6)
    np.testing.assert_allclose(again[:, 4:], model.hidden(ids[:, 4:]), rtol=1e-5, atol=1e-6)


def test_a_kernel_this_machine_lacks_is_refused_when_the_model_is_built():
    with pytest.raises(ValueError, match="attention_kernel='pallas' runs on TPU or GPU; this is cpu"):
        build_value(ModelSpec(attention_kernel="pallas"), HeadConfig("categorical", 3))
    with pytest.raises(ValueError, match=r"attention_kernel must be one of \('auto', 'xla', 'pallas', 'cudnn'\)"):
        ModelSpec(attention_kernel="flash")
    with pytest.raises(ValueError, match="attention_kernel must be one of"):
        dataclasses.replace(CFG, attention_kernel="triton")
    assert build_value(ModelSpec(attention_kernel="xla"), HeadConfig("categorical", 3)).backbone.cfg.attention_kernel \
        == "xla"


def test_a_half_precision_model_on_a_gpu_reaches_cudnn_with_its_mask(monkeypatch):
    """``auto`` on a GPU in bfloat16 calls cuDNN for a mask the Pallas kernel cannot express
    (shared-prompt branches), padded to an even length (the call is made here with XLA's
    implementation: the same function otherwise)."""
    cfg = dataclasses.replace(CFG, num_heads=2, num_kv_heads=1, head_dim=8)  # cuDNN: a multiple of 8
    model = Transformer(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 16, (1, 12)), jnp.int32)
    segment_ids = jnp.asarray([[1] * 12])
    branch_ids = jnp.asarray([[0] * 4 + [1] * 5 + [2] * 3])  # a prompt of 4, two answers after it
    want = model.hidden(ids, None, segment_ids, branch_ids)
    calls = []
    dot_product = flash.dot_product

    def via_xla(q, k, v, allowed, implementation):
        calls.append(implementation)
        return dot_product(q, k, v, allowed, "xla")

    monkeypatch.setattr(flash, "_platform", lambda: "gpu")
    monkeypatch.setattr(flash, "dot_product", via_xla)
    got = model.hidden(ids, None, segment_ids, branch_ids)
    assert calls == ["cudnn"] * cfg.num_layers
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
    # and the second answer is not the first one's continuation: it equals prompt + answer alone
    alone = model.hidden(jnp.concatenate([ids[:, :4], ids[:, 9:]], axis=1))
    np.testing.assert_allclose(np.asarray(got[:, 9:], np.float32), np.asarray(alone[:, 4:], np.float32),
                               rtol=3e-2, atol=3e-2)
