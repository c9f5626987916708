"""Per-host prompt slices (a pod's hosts each make only the prompts they decode): every task's rows
equal the rows of its full draw and leave the generator where the full draw leaves it (switch
times are drawn next), and each host's rows over a collection's chunks are the ones its devices hold."""

import numpy as np
import pytest

from qsharp_jax import rollout
from qsharp_jax.tasks import prompt_rows
from qsharp_jax.tasks import star_graph as sg
from qsharp_jax.tasks.math_data import Problem
from qsharp_jax.tasks.math_task import MathTask
from qsharp_jax.tasks.planted_token import PlantedTokenTask
from test_math_data import tiny_chat_tokenizer


class FullDrawOnly:
    """A task with only ``sample_prompts``: prompt_rows makes every row and slices."""

    def __init__(self, task):
        self.sample_prompts = task.sample_prompts


def _math_task():
    tok = tiny_chat_tokenizer()
    problems = [Problem("two plus three", "5"), Problem("one", "1"), Problem("one plus one", "2")]
    return MathTask(tok, problems, problems[:1], max_prompt_len=32, eos_id=tok.convert_tokens_to_ids("<end>"))


@pytest.mark.parametrize("make", [PlantedTokenTask, lambda: sg.StarGraphTask.make(sg.GraphConfig(2, 3, 10), train=60, test=5),
                                  _math_task, lambda: FullDrawOnly(PlantedTokenTask())],
                         ids=["planted_token", "star_graph", "math", "sample_prompts only"])
def test_a_slice_is_the_rows_of_the_full_draw(make):
    task = make()
    try:
        n, rows = 40, np.array([0, 3, 4, 17, 39])
        full_rng, some_rng = np.random.default_rng([5, 1, 0]), np.random.default_rng([5, 1, 0])
        ids, mask = task.sample_prompts(full_rng, n)
        some_ids, some_mask = prompt_rows(task, some_rng, n, rows)
        np.testing.assert_array_equal(some_ids, ids[rows])
        np.testing.assert_array_equal(some_mask, mask[rows])
        assert full_rng.integers(0, 1 << 30) == some_rng.integers(0, 1 << 30)  # the switch times' draw is the same
        with pytest.raises(ValueError, match=r"prompt rows must lie in \[0, 40\), got 0..40"):
            prompt_rows(task, np.random.default_rng(0), n, np.array([0, 40]))
    finally:
        getattr(task, "close", lambda: None)()


def test_each_host_holds_its_devices_rows_of_every_chunk():
    # 10 rows in calls of 4 (the last padded with copies of row 9); this host's devices hold positions 0 and 1
    plan = rollout._Chunks(n=10, size=4, starts=range(0, 10, 4), rows_of={}, local=np.array([0, 1]))
    np.testing.assert_array_equal(plan.mine(), [0, 1, 4, 5, 8, 9])
    have = plan.mine()
    ids = (have[:, None] * 10 + np.arange(3)).astype(np.int32)  # row r's prompt: r0, r1, r2
    chunk_ids, chunk_mask = rollout._prompts_of(plan.rows(8), plan.local, have, ids, ids > 0)
    # only its positions' rows: the other hosts place theirs (from_process_rows)
    np.testing.assert_array_equal(chunk_ids, [[80, 81, 82], [90, 91, 92]])
    np.testing.assert_array_equal(chunk_mask, chunk_ids > 0)
    everything = rollout._Chunks(n=10, size=4, starts=range(0, 10, 4), rows_of={}, local=None)
    np.testing.assert_array_equal(everything.mine(), np.arange(10))


def test_a_slice_of_the_wrong_rows_is_refused():
    import jax
    from flax import nnx

    from qsharp_jax.models.transformer import Transformer, TransformerConfig

    ref = Transformer(TransformerConfig(vocab_size=8, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2,
                                        head_dim=8, mlp_dim=32, max_positions=16), rngs=nnx.Rngs(0))
    ids, mask = np.ones((5, 2), np.int32), np.ones((5, 2), bool)
    with pytest.raises(ValueError, match=r"collect/0: 5 prompts given, but this process decodes 10 of the 10 rows"):
        rollout.generate_chunked(ref, ids, mask, key=jax.random.key(0), batch=4, total_rows=10, name="collect/0",
                                 max_new_tokens=2)


def test_a_math_host_tokenizes_its_slice_and_the_rows_it_decodes(monkeypatch):
    """On a pod each host tokenizes every P-th train problem (the hosts gather the lengths: which
    problems fit decides the draw) and later only the problems of the rows it decodes; its rows
    equal those of one process's full draw. Here host 0 of 2, the other host's lengths supplied."""
    import jax

    from qsharp_jax import distributed
    from qsharp_jax.tasks import math_data, math_task

    tok = tiny_chat_tokenizer()
    problems = [Problem(" ".join(["one plus"] * (i % 4) + ["one"]), str(i % 4 + 1)) for i in range(10)]
    problems[3] = Problem("one plus " * 40 + "one", "41")  # longer than max_prompt_len: never drawn
    eos = tok.convert_tokens_to_ids("<end>")
    single = MathTask(tok, problems, problems[:1], max_prompt_len=48, eos_id=eos)
    n, rows = 40, np.array([1, 6, 7, 30])
    want_ids, want_mask = single.sample_prompts(np.random.default_rng(3), n)
    want_golds = single.golds(want_ids[rows], want_mask[rows])
    single.close()

    encoded = []

    def counting(tokenizer, problem):
        encoded.append(next(j for j, p in enumerate(problems) if p is problem))
        return math_data.encode_prompt(tokenizer, problem)

    other = np.arange(1, 10, 2)
    monkeypatch.setattr(math_task, "encode_prompt", counting)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(distributed, "gather_objects", lambda mine: [
        mine, (other, [len(math_data.encode_prompt(tok, problems[i])) for i in other])])
    with pytest.warns(UserWarning, match="1 of 10 prompts are longer than max_prompt_len=48"):
        host = MathTask(tok, problems, problems[:1], max_prompt_len=48, eos_id=eos)
    try:
        assert encoded == [0, 2, 4, 6, 8]  # its slice only
        ids, mask = host.sample_prompt_rows(np.random.default_rng(3), n, rows)
        np.testing.assert_array_equal(ids, want_ids[rows])
        np.testing.assert_array_equal(mask, want_mask[rows])
        later = encoded[5:]  # the rows' problems not of its slice, each tokenized once
        assert len(later) == len(set(later)) and set(later) <= set(other.tolist())
        assert host.golds(ids, mask) == want_golds
    finally:
        host.close()
