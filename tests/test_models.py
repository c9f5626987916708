"""Our Flax transformers against Hugging Face PyTorch, logit for logit, and the cached paths against
the uncached forward."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_fixtures import CONFIGS, make_checkpoint, torch_logits
from qsharp_jax import sharding
from qsharp_jax.models import from_hf, load_tokenizer
from qsharp_jax.models.hf import SafetensorsDir

KINDS = sorted(CONFIGS)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for kind in KINDS:
        path = tmp_path_factory.mktemp(kind)
        out[kind] = (path, make_checkpoint(kind, path))
    return out


def left_padded_batch(rng, vocab, batch=3, length=24):
    ids = rng.integers(0, vocab, size=(batch, length))
    mask = np.ones((batch, length), bool)
    for b, pad in enumerate([0, 5, 11][:batch]):
        mask[b, :pad] = False
        ids[b, :pad] = 0
    return ids, mask


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_pytorch(checkpoints, kind):
    path, torch_model = checkpoints[kind]
    model = from_hf(path)
    ids = np.random.default_rng(0).integers(0, 61, size=(2, 40 if kind != "gpt2" else 32))
    expected = torch_logits(torch_model, ids)
    assert np.abs(expected).max() > 1.0  # the comparison is not between near-zero numbers
    np.testing.assert_allclose(jax.jit(model)(jnp.asarray(ids, jnp.int32)), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_left_padding_matches_pytorch(checkpoints, kind):
    path, torch_model = checkpoints[kind]
    model = jax.jit(from_hf(path))
    ids, mask = left_padded_batch(np.random.default_rng(1), 61)
    got = np.asarray(model(jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
    expected = torch_logits(torch_model, ids, mask)
    np.testing.assert_allclose(got[mask], expected[mask], atol=1e-4, rtol=1e-4)
    # and each row equals the same sequence without padding
    for b in range(ids.shape[0]):
        alone = np.asarray(model(jnp.asarray(ids[b : b + 1, mask[b]], jnp.int32)))[0]
        np.testing.assert_allclose(got[b, mask[b]], alone, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_cached_decoding_equals_full_forward(checkpoints, kind):
    model = from_hf(checkpoints[kind][0])
    ids, mask = left_padded_batch(np.random.default_rng(2), 61, length=20)
    full = np.asarray(jax.jit(model)(jnp.asarray(ids, jnp.int32), jnp.asarray(mask)))
    prompt = 14
    cache = model.init_cache(ids.shape[0], 24)
    extend = jax.jit(lambda m, i, c, a: m.extend(i, c, a), donate_argnums=2)  # the cache is updated in place
    logits, cache = extend(model, jnp.asarray(ids[:, :prompt], jnp.int32), cache, jnp.asarray(mask[:, :prompt]))
    steps = [np.asarray(logits)]
    for t in range(prompt, ids.shape[1]):  # one token at a time
        logits, cache = extend(model, jnp.asarray(ids[:, t : t + 1], jnp.int32), cache, jnp.ones((3, 1), bool))
        steps.append(np.asarray(logits))
    cached = np.concatenate(steps, axis=1)
    np.testing.assert_allclose(cached[mask], full[mask], atol=1e-4, rtol=1e-4)
    assert int(cache.index) == ids.shape[1]
    np.testing.assert_array_equal(cache.positions, mask.sum(1))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_candidates_equal_appending_each_token(checkpoints, kind):
    model = from_hf(checkpoints[kind][0])
    ids, mask = left_padded_batch(np.random.default_rng(3), 61, length=16)
    cache = model.init_cache(3, 20)
    extend = jax.jit(model.extend)
    _, cache = extend(jnp.asarray(ids, jnp.int32), cache, jnp.asarray(mask))
    candidates = jnp.asarray(np.random.default_rng(4).integers(0, 61, size=(3, 5)), jnp.int32)
    got = np.asarray(jax.jit(lambda c, k: model.logits(model.candidates_hidden(c, k)))(candidates, cache))
    for j in range(5):
        one, _ = extend(candidates[:, j : j + 1], cache)
        np.testing.assert_allclose(got[:, j], np.asarray(one)[:, 0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_branches_equal_appending_each_token_to_each_prefix(checkpoints, kind):
    """branches_hidden: k one-token extensions of every prefix in one forward (left padding, RoPE,
    learned positions and Mistral's window included)."""
    model = from_hf(checkpoints[kind][0])
    ids, mask = left_padded_batch(np.random.default_rng(7), 61, length=12)
    branch = np.random.default_rng(8).integers(0, 61, size=(3, 12, 3))
    hidden, branches = jax.jit(model.branches_hidden)(jnp.asarray(ids, jnp.int32), jnp.asarray(mask),
                                                      jnp.asarray(branch))
    whole = jax.jit(model.hidden)
    np.testing.assert_allclose(hidden, whole(jnp.asarray(ids, jnp.int32), jnp.asarray(mask)), atol=1e-5)
    # brute force: every extended prefix as its own (right-padded) sequence, in one batch
    seqs, where = [], []
    for b in range(3):
        for t in range(12):
            if mask[b, t]:
                prefix = ids[b, : t + 1][mask[b, : t + 1]]
                for j in range(3):
                    seqs.append(np.concatenate([prefix, branch[b, t, j : j + 1]]))
                    where.append((b, t, j))
    padded = np.zeros((len(seqs), 13), np.int32)
    real = np.zeros((len(seqs), 13), bool)
    for i, seq in enumerate(seqs):
        padded[i, : len(seq)], real[i, : len(seq)] = seq, True
    alone = np.asarray(whole(jnp.asarray(padded), jnp.asarray(real)))
    for i, (b, t, j) in enumerate(where):
        np.testing.assert_allclose(branches[b, t, j], alone[i, len(seqs[i]) - 1], atol=1e-4, rtol=1e-4)


def test_mistral_sliding_window_is_applied(checkpoints):
    """Tokens further back than the window must not matter (guards the window mask itself)."""
    model = from_hf(checkpoints["mistral"][0])
    assert model.cfg.sliding_window == 5
    ids = np.random.default_rng(5).integers(0, 61, size=(1, 12))
    changed = ids.copy()
    changed[0, 0] = (ids[0, 0] + 1) % 61
    a, b = (np.asarray(jax.jit(model)(jnp.asarray(x, jnp.int32))) for x in (ids, changed))
    # position 11 sees positions 7..11 in layer 2 and 3..11 through layer 1: position 0 is out of reach
    np.testing.assert_allclose(a[0, 11], b[0, 11], atol=1e-6)
    assert np.abs(a[0, 1] - b[0, 1]).max() > 1e-3


def test_sharded_index_checkpoint_and_mesh_placement(tmp_path):
    torch_model = make_checkpoint("llama", tmp_path, seed=1, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    model = from_hf(tmp_path, mesh=mesh)
    spec = lambda x: tuple(x[...].sharding.spec)  # noqa: E731
    assert spec(model.layers[0].q) == ("tensor", None, "fsdp")
    assert spec(model.layers[1].k) == ("tensor", None, "fsdp")
    assert spec(model.layers[0].down) == ("fsdp", "tensor")
    assert spec(model.lm_head) == (None, "fsdp")  # vocab 61 does not divide by 2: replicated
    assert len(model.layers[0].q[...].addressable_shards) == 8
    ids = np.random.default_rng(6).integers(0, 61, size=(4, 10))
    ids_sharded = jax.device_put(jnp.asarray(ids, jnp.int32), sharding.batch_sharding(mesh, 2))
    got = jax.jit(lambda m, i: m(i))(model, ids_sharded)
    np.testing.assert_allclose(got, torch_logits(torch_model, ids), atol=1e-4, rtol=1e-4)


def test_bf16_checkpoint_loads_in_bf16_and_f32(tmp_path):
    make_checkpoint("qwen2", tmp_path, seed=2, dtype=torch.bfloat16)
    ids = np.random.default_rng(7).integers(0, 61, size=(2, 12))
    # float32 torch model of the bf16-rounded weights (fresh, so its RoPE tables are float32 too)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    reference = torch_logits(torch_model, ids)
    f32 = from_hf(tmp_path)
    np.testing.assert_allclose(jax.jit(f32)(jnp.asarray(ids, jnp.int32)), reference, atol=1e-4, rtol=1e-4)
    bf16 = from_hf(tmp_path, dtype=jnp.bfloat16)
    assert bf16.layers[0].q[...].dtype == jnp.bfloat16
    out = np.asarray(jax.jit(bf16)(jnp.asarray(ids, jnp.int32)))
    assert out.dtype == np.float32
    assert np.abs(out - reference).max() < 0.1 * np.abs(reference).max()


def _save_word_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(58)} | {"<unk>": 58, "<s>": 59, "</s>": 60}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}</s>"
    fast.save_pretrained(path)


def test_tokenizer_from_the_same_directory(tmp_path, checkpoints):
    path = tmp_path / "llama"
    shutil.copytree(checkpoints["llama"][0], path)
    _save_word_tokenizer(path)
    loaded = load_tokenizer(path, from_hf(path))
    assert loaded("w3 w7")["input_ids"] == [3, 7]
    assert loaded.apply_chat_template([{"role": "user", "content": "w1"}], tokenize=False) == "w1 </s>"
    # transformers picks Qwen2's tokenizer class from config.json, which adds <|endoftext|>: 62 > 61
    path = tmp_path / "qwen2"
    shutil.copytree(checkpoints["qwen2"][0], path)
    _save_word_tokenizer(path)
    with pytest.raises(ValueError, match="tokenizer .* has 62 tokens but the model's vocabulary has only 61"):
        load_tokenizer(path, from_hf(path))


class TestBadCheckpoints:
    def test_not_a_directory_or_no_config(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="not a directory"):
            from_hf(tmp_path / "nope")
        with pytest.raises(FileNotFoundError, match="no config.json"):
            from_hf(tmp_path)

    def test_no_weights(self, tmp_path, checkpoints):
        shutil.copy(checkpoints["llama"][0] / "config.json", tmp_path / "config.json")
        with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
            from_hf(tmp_path)

    def test_unsupported_model_type(self, tmp_path, checkpoints):
        shutil.copytree(checkpoints["llama"][0], tmp_path / "m")
        cfg = json.loads((tmp_path / "m" / "config.json").read_text()) | {"model_type": "bert"}
        (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ValueError, match="unsupported model_type 'bert'; supported: gpt2, llama, qwen2, mistral"):
            from_hf(tmp_path / "m")

    def test_missing_unexpected_and_misshaped_tensors_are_listed(self, tmp_path, checkpoints):
        from safetensors.numpy import save_file

        src = SafetensorsDir(checkpoints["llama"][0])
        tensors = {n: np.asarray(src.get(n)).astype(np.float32) for n in src.names()}
        del tensors["model.layers.1.mlp.up_proj.weight"]
        tensors["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
        tensors["model.norm.weight"] = np.zeros(7, np.float32)
        path = tmp_path / "broken"
        path.mkdir()
        shutil.copy(checkpoints["llama"][0] / "config.json", path / "config.json")
        save_file(tensors, str(path / "model.safetensors"))
        with pytest.raises(ValueError) as info:
            from_hf(path)
        message = str(info.value)
        assert "missing tensors (names after any 'model.' prefix): layers.1.mlp.up_proj.weight;" in message
        assert "unexpected tensors: model.layers.0.extra.weight" in message
        assert "model.layers.0.mlp.up_proj.weight" not in message  # the layer that is present is used
        assert "mis-shaped tensors: norm.weight: gives (7,) for final_norm_scale, expected (32,)" in message
