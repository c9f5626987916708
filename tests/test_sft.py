"""Supervised fine-tuning (the π_ref pretraining of the experiments): checkpoint restore and refusal."""

import dataclasses

import numpy as np
import pytest

from qsharp_jax.models.build import ModelSpec, build_reference
from qsharp_jax import sft as sft_lib
from qsharp_jax.sft import SFTConfig, train_sft

SPEC = ModelSpec(architecture="gpt2", vocab_size=7, hidden_size=8, num_layers=1, num_heads=2, mlp_dim=16,
                 max_positions=8, seed=0)


@dataclasses.dataclass(frozen=True)
class DataV1:
    """What a checkpoint's model depends on, as an older release saved it."""

    rows: int = 16


@dataclasses.dataclass(frozen=True)
class DataV2:
    """The same config after a release added a field (default: the old behaviour)."""

    rows: int = 16
    shuffle: bool = False


def test_restores_its_checkpoint_and_older_configs_refuses_others(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    prompts, responses = rng.integers(0, 7, (16, 3)), rng.integers(0, 7, (16, 2))
    masks = np.ones(prompts.shape, bool), np.ones(responses.shape, bool)
    cfg = SFTConfig(epochs=2, batch_size=8)

    def sft(meta, epochs=2):
        return train_sft(dataclasses.replace(cfg, epochs=epochs), build_reference(SPEC), prompts, masks[0], responses,
                         masks[1], seed=1, directory=tmp_path, meta={"data": meta}, progress=False)

    trained = sft(DataV1())
    weights = np.asarray(trained.embed[...])
    assert not np.allclose(weights, np.asarray(build_reference(SPEC).embed[...]))  # it did train
    # a later release's config (a new field at its default) restores the checkpoint, training nothing
    with monkeypatch.context() as m:
        m.setattr(sft_lib.train, "fit", lambda *a, **k: pytest.fail("trained again"))
        restored = sft(DataV2())
    np.testing.assert_array_equal(np.asarray(restored.embed[...]), weights)
    with pytest.raises(ValueError, match=r"fields that differ: data.shuffle \(saved False, now True\)"):
        sft(DataV2(shuffle=True))
    with pytest.raises(ValueError, match=r"fields that differ: epochs \(saved 2, now 3\)"):
        sft(DataV1(), epochs=3)


def test_an_unverifiable_checkpoint_is_moved_aside_and_retrained_not_a_crash_after_training(tmp_path):
    # e.g. a run directory from a release before checksums, or a save killed before its checksums:
    # restore skips it; the save after retraining used to fail with "checkpoint 0 already exists"
    rng = np.random.default_rng(0)
    prompts, responses = rng.integers(0, 7, (16, 3)), rng.integers(0, 7, (16, 2))
    masks = np.ones(prompts.shape, bool), np.ones(responses.shape, bool)
    sft = lambda: train_sft(SFTConfig(epochs=1, batch_size=8), build_reference(SPEC), prompts, masks[0],  # noqa: E731
                            responses, masks[1], seed=1, directory=tmp_path / "reference", progress=False)
    first = np.asarray(sft().embed[...])
    (tmp_path / "reference" / "0" / "checksums.json").unlink()
    with pytest.warns(UserWarning, match=r"checkpoint 0 in .*reference is unusable: checksums.json is missing .*; "
                                         r"moved to .*reference-corrupt"):
        again = np.asarray(sft().embed[...])
    np.testing.assert_array_equal(again, first)  # retrained the same way (same seed and data)
    assert (tmp_path / "reference" / "0" / "checksums.json").exists()
    assert [p.name for p in (tmp_path / "reference-corrupt").iterdir()]  # kept, not deleted
