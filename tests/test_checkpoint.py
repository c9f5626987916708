"""Checkpoints: exact round trip, retention, config mismatch, corrupt newest, sharded restore."""

import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from qsharp_jax import sharding
from qsharp_jax.checkpoint import Checkpoints
from qsharp_jax.models.transformer import TransformerConfig
from qsharp_jax.models.value import HeadConfig, ValueModel
from qsharp_jax.objectives import value_loss
from qsharp_jax.train import OptimizerConfig, init_state, make_optimizer, make_train_step, state_shardings
from test_train import toy_batch

CFG = TransformerConfig(vocab_size=10, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8,
                        mlp_dim=16, max_positions=16)


def trained_state(steps, seed=0):
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-2))
    state = init_state(ValueModel(CFG, HeadConfig(), rngs=nnx.Rngs(seed)), optimizer, jax.random.key(seed))
    step = make_train_step(lambda m, b: value_loss(m, b), optimizer)
    for _ in range(steps):
        state, _ = step(state, toy_batch())
    return state, optimizer


def assert_states_equal(a, b):
    for x, y in zip(jax.tree.leaves(a.params) + jax.tree.leaves(a.opt_state),
                    jax.tree.leaves(b.params) + jax.tree.leaves(b.opt_state)):
        np.testing.assert_array_equal(x, y)
    assert int(a.step) == int(b.step)
    np.testing.assert_array_equal(jax.random.key_data(a.rng), jax.random.key_data(b.rng))


def test_round_trip_and_retention(tmp_path):
    """Every saved state has its own PRNG key, unlike the template: a restore that kept the
    template's key (or another checkpoint's) fails the comparison."""
    ckpt = Checkpoints(tmp_path, keep=2)
    template, _ = trained_state(0)
    assert ckpt.restore(template) is None
    for iteration in range(3):
        state, _ = trained_state(iteration + 1)
        state = state.replace(rng=jax.random.key(100 + iteration))
        ckpt.save(iteration, state, {"iteration": iteration, "config": {"eta": 0.1}})
    assert ckpt.steps() == [1, 2]
    restored, meta = Checkpoints(tmp_path).restore(template, {"eta": 0.1})
    assert meta["iteration"] == 2
    assert_states_equal(restored, state)


def test_config_mismatch_names_the_fields(tmp_path):
    ckpt = Checkpoints(tmp_path)
    state, _ = trained_state(1)
    ckpt.save(0, state, {"config": {"eta": 0.1, "top_k": 10}})
    with pytest.raises(ValueError, match=r"fields that differ: eta \(saved 0.1, now 0.5\)"):
        ckpt.restore(state, {"eta": 0.5, "top_k": 10})


def test_config_of_another_shape_is_named_not_skipped(tmp_path):
    """A run of another config whose arrays do not even fit the template (here a wider model) is
    refused by its config, not taken for a corrupt checkpoint and silently skipped."""
    import dataclasses

    ckpt = Checkpoints(tmp_path)
    state, _ = trained_state(1)
    ckpt.save(0, state, {"config": {"hidden_size": 16}})
    wide = dataclasses.replace(CFG, hidden_size=32, head_dim=16)
    template = init_state(ValueModel(wide, HeadConfig(), rngs=nnx.Rngs(0)), make_optimizer(OptimizerConfig()),
                          jax.random.key(0))
    with pytest.raises(ValueError, match=r"hidden_size \(saved 16, now 32\)"):
        ckpt.restore(template, {"hidden_size": 32})


def test_corrupt_newest_falls_back(tmp_path):
    ckpt = Checkpoints(tmp_path, keep=3)
    first, _ = trained_state(1)
    second, _ = trained_state(2)
    ckpt.save(0, first, {"iteration": 0})
    ckpt.save(1, second, {"iteration": 1})
    shutil.rmtree(tmp_path / "1" / "state")  # the newest lost its arrays
    with pytest.warns(UserWarning, match=r"checkpoint 1 .* is unusable: file state/\S+ is missing"):
        restored, meta = ckpt.restore(first)
    assert meta["iteration"] == 0
    assert_states_equal(restored, first)


def _largest_data_file(step_dir):
    return max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_flipped_bit_is_detected_quarantined_and_the_step_redone(tmp_path, capfd):
    """One flipped bit in the arrays of the newest checkpoint (which orbax alone restores without a
    word): restore skips it by its checksum, moves it aside (kept), and the redone step can be
    saved again and restores as the new state."""
    ckpt = Checkpoints(tmp_path / "checkpoints", keep=3)
    first, _ = trained_state(1)
    second, _ = trained_state(2)
    ckpt.save(0, first, {"iteration": 0})
    ckpt.save(1, second, {"iteration": 1})
    victim = _largest_data_file(tmp_path / "checkpoints" / "1")
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x10
    victim.write_bytes(bytes(data))
    assert ckpt.verify(0) is None and "checksum mismatch" in ckpt.verify(1)
    with pytest.warns(UserWarning, match=r"checkpoint 1 .* is unusable: file \S+ is corrupt .*moved to"):
        restored, meta = ckpt.restore(first, quarantine=True)
    assert meta["iteration"] == 0
    assert_states_equal(restored, first)
    assert ckpt.steps() == [0]
    kept = list((tmp_path / "checkpoints-corrupt").iterdir())
    assert len(kept) == 1 and kept[0].name.startswith("1-")
    redone, _ = trained_state(3)
    ckpt.save(1, redone, {"iteration": 1})  # the redone iteration is written for real
    restored, meta = Checkpoints(tmp_path / "checkpoints").restore(first)
    assert meta["iteration"] == 1
    assert_states_equal(restored, redone)
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("damage", ["manifest", "checksums", "truncate"])
def test_damaged_files_fall_back_without_tracebacks(tmp_path, capfd, damage):
    """A deleted ocdbt manifest (which made orbax print 22 'Event loop is closed' tracebacks), a
    step killed before its checksums were written, a truncated data file."""
    ckpt = Checkpoints(tmp_path, keep=3)
    first, _ = trained_state(1)
    ckpt.save(0, first, {"iteration": 0})
    ckpt.save(1, trained_state(2)[0], {"iteration": 1})
    step_dir = tmp_path / "1"
    if damage == "manifest":
        next(step_dir.rglob("manifest.ocdbt")).unlink()
        expected = r"manifest.ocdbt is missing"
    elif damage == "checksums":
        (step_dir / "checksums.json").unlink()
        expected = r"checksums.json is missing \(the save was interrupted"
    else:
        victim = _largest_data_file(step_dir)
        victim.write_bytes(victim.read_bytes()[:10])
        expected = r"is corrupt"
    with pytest.warns(UserWarning, match=expected):
        restored, meta = ckpt.restore(first)
    assert meta["iteration"] == 0
    assert_states_equal(restored, first)
    assert "Traceback" not in capfd.readouterr().err


def test_a_step_is_never_silently_skipped(tmp_path):
    ckpt = Checkpoints(tmp_path)
    state, _ = trained_state(1)
    ckpt.save(0, state, {})
    with pytest.raises(ValueError, match="checkpoint 0 already exists"):
        ckpt.save(0, state, {})


def test_restore_onto_a_mesh(tmp_path):
    state, _ = trained_state(2)
    Checkpoints(tmp_path).save(0, state, {})
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    template, _ = trained_state(0)
    template = jax.device_put(template, state_shardings(template, mesh))
    restored, _ = Checkpoints(tmp_path).restore(template)
    q = restored.params["backbone"]["layers"][0]["q"]
    assert q.sharding.spec == jax.sharding.PartitionSpec("tensor", None, "fsdp")
    assert_states_equal(restored, state)
