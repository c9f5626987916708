"""`qsharp plan`: a full-size recipe (Llama 3 8B + Llama 3.2 1B) lowered and compiled on the 8 fake
CPU devices from abstract parameters, with no weights anywhere. The parameter bytes are checked
against the published parameter counts of the two checkpoints."""

import os
import re

import pytest

from qsharp_jax import cli, plan
from qsharp_jax.models.presets import PRESETS, check_matches

RECIPE = "experiments/math/llama3_8b_gsm8k.yaml"
LLAMA3_8B_PARAMS = 8_030_261_248  # Meta-Llama-3-8B
LLAMA32_1B_PARAMS = 1_235_814_400  # Llama-3.2-1B (tied embeddings)


def test_recipe_dry_run_prints_memory_per_device(capsys, monkeypatch):
    # the CLI lowers both programs at full size and compiles the rollout (compiling the train step
    # as well, what `qsharp plan` does by default, would add ~10 s to the suite)
    results, real_plan = [], plan.plan

    def rollout_compiled(cfg, *, compile):
        assert compile is False  # what --no-compile asks for
        results.append(real_plan(cfg, compile=("rollout",)))
        return results[-1]

    monkeypatch.setattr(plan, "plan", rollout_compiled)
    monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))  # the CLI adds its flags for later processes
    assert cli.main(["plan", RECIPE, "--no-compile"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(" ".join(f"{k}=\\d+" for k in plan.SUMMARY_KEYS), last), last
    result, = results
    summary = result["summary"]
    assert last == plan.summary_line(summary)
    # data-parallel mesh [8, 1, 1]: every device holds all of π_ref in bfloat16
    assert summary["ref_params_bytes_per_device"] == 2 * LLAMA3_8B_PARAMS
    # the value model's bfloat16 parameters and AdamW's two moments, plus the 11-atom head (2048 x 11 + 11)
    head = 2048 * 11 + 11
    assert summary["value_state_bytes_per_device"] == 6 * (LLAMA32_1B_PARAMS + head) + 4 + 8 + 2 * 4  # + step,
    # PRNG key, and the step counts of Adam and of the learning-rate schedule
    # keys and values: the recipe's 128 continuous-batching slots (its 512-row chunks queue for them) / 8 devices,
    # 512 + 1024 positions, π_ref 32 layers x 8 KV heads x 128, the value model 16 x 8 x 64
    assert summary["kv_cache_bytes_per_device"] == 2 * 2 * 16 * 1536 * (32 * 8 * 128 + 16 * 8 * 64)
    rollout = result["memory"]["rollout"]
    assert rollout["arguments"] >= 4 * LLAMA3_8B_PARAMS  # compiled in float32 on XLA:CPU
    assert 0 < result["rollout_temporaries"] < rollout["temporaries"]  # corrected to bfloat16 caches
    assert summary["total_bytes_per_device"] > sum(summary[k] for k in plan.SUMMARY_KEYS[:2])
    with pytest.raises(ValueError, match=r"needs [\d.]+GiB per device, more than device_memory=1.00GiB"):
        plan.check_fits(summary, 2**30)


def test_presets_are_checked_against_a_checkpoints_config():
    hf = dict(PRESETS["llama-3.2-1b"])
    check_matches("llama-3.2-1b", hf, "ckpt")
    with pytest.raises(ValueError, match=r"ckpt/config.json is not a llama-3-8b checkpoint: hidden_size \(preset 4096, "
                                         r"checkpoint 2048\)"):
        check_matches("llama-3-8b", hf, "ckpt")


def test_device_memory_sizes_and_the_table():
    assert plan.parse_bytes("16GiB") == 16 * 2**30 and plan.parse_bytes("80GB") == 80e9
    assert plan.parse_bytes("512MiB") == 2**29 and plan.parse_bytes("16") == 16 * 2**30  # a bare number is GiB
    for bad in ("lots", "-1GiB", "16PB", ""):
        with pytest.raises(ValueError, match="must be a positive size like 16GiB"):
            plan.parse_bytes(bad)
    summary = dict(zip(plan.SUMMARY_KEYS, [2**30, 2 * 2**30, 3 * 2**30, 2**29, 6 * 2**30]))
    lines = plan.table(summary, 8 * 2**30).splitlines()
    assert lines[2] == "| ref_params | 1073741824 | 1.00 | 12% |" and lines[-1] == "| total | 6442450944 | 6.00 | 75% |"


def test_a_plan_that_does_not_fit_is_refused_naming_what_to_change():
    from qsharp_jax import config
    from qsharp_jax.runs import RunConfig

    cfg = config.load(RunConfig, RECIPE, ["value.remat=false"])
    gib = 2**30

    def refusal(ref, value, kv, train):
        summary = dict(zip(plan.SUMMARY_KEYS, [ref * gib, value * gib, kv * gib, train * gib,
                                               (ref + value + max(kv, train)) * gib]))
        with pytest.raises(ValueError) as error:
            plan.check_fits(summary, 32 * gib, cfg)
        return str(error.value)

    assert "the parameters alone exceed it: shard them" in refusal(30, 8, 1, 1)
    assert "set value.remat=true (recompute activations), lower algorithm.batch_size=32" in refusal(8, 4, 2, 30)
    assert "lower algorithm.rollout_slots=128" in refusal(8, 4, 30, 2)
    plan.check_fits(dict(zip(plan.SUMMARY_KEYS, [gib] * 5)), 32 * gib, cfg)  # fits: nothing raised


def test_a_batch_that_does_not_split_over_the_mesh_is_refused_before_lowering():
    from qsharp_jax import config
    from qsharp_jax.runs import RunConfig

    cfg = config.load(RunConfig, RECIPE, ["mesh=[8,1,1]", "algorithm.batch_size=12"])
    with pytest.raises(ValueError, match=r"algorithm.batch_size=12 does not split over the mesh's data x fsdp = 8 "
                                         r"devices .*set algorithm.batch_size=16"):
        plan.plan(cfg, compile=False)
