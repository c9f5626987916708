"""Star-graph task: generator properties, tokenizer round trip, scoring, bad input."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsharp_jax.tasks import star_graph as sg


def brute_force_path(edges, source, goal):
    """Depth-first search over the edge list: every path from source to goal."""
    succ = {}
    for a, b in edges:
        succ.setdefault(int(a), []).append(int(b))
    found, stack = [], [[int(source)]]
    while stack:
        path = stack.pop()
        if path[-1] == goal:
            found.append(path)
        stack += [path + [n] for n in succ.get(path[-1], []) if n not in path]
    return found


@settings(max_examples=30, deadline=None)
@given(degree=st.integers(1, 5), length=st.integers(2, 8), extra=st.integers(0, 10), seed=st.integers(0, 2**31))
def test_unique_path_and_the_answer_is_it(degree, length, extra, seed):
    cfg = sg.GraphConfig(degree, length, degree * (length - 1) + 1 + extra)
    graphs = sg.sample_graphs(cfg, 6, np.random.default_rng(seed))
    vocab = sg.Vocabulary(cfg.num_nodes)
    prompts, answers = sg.encode_prompts(cfg, graphs), sg.encode_answers(cfg, graphs.path)
    assert prompts.shape == (6, cfg.prompt_length) and answers.shape == (6, cfg.answer_length)
    for i in range(6):
        nodes = graphs.edges[i].ravel()
        assert len(set(nodes.tolist())) == cfg.nodes_per_graph  # degree·(L−1)+1 distinct labels
        assert np.all(nodes < cfg.num_nodes)
        assert sorted(np.bincount(graphs.edges[i][:, 0])[graphs.source[i]:graphs.source[i] + 1]) == [degree]
        paths = brute_force_path(graphs.edges[i], graphs.source[i], graphs.goal[i])
        assert paths == [graphs.path[i].tolist()] and len(paths[0]) == length
        assert graphs.goal[i] != graphs.source[i]
        text = vocab.decode(prompts[i])
        edges = ",".join(f"{a},{b}" for a, b in graphs.edges[i]).split(",")
        assert text == "|".join(f"{edges[2 * k]},{edges[2 * k + 1]}" for k in range(cfg.num_edges)) + \
            f"/{graphs.source[i]},{graphs.goal[i]}="
        assert vocab.decode(answers[i]) == ",".join(map(str, paths[0])) + sg.EOS
    np.testing.assert_array_equal(sg.paths_from_prompts(cfg, prompts), graphs.path)


def test_splits_are_reproducible_and_disjoint():
    cfg = sg.GraphConfig(2, 3, 6)  # tiny: collisions between splits are likely and must be removed
    train, test = sg.make_splits(cfg, train=400, test=100, seed=3)
    again, _ = sg.make_splits(cfg, train=400, test=100, seed=3)
    np.testing.assert_array_equal(train.prompts, again.prompts)
    assert not {p.tobytes() for p in train.prompts} & {p.tobytes() for p in test.prompts}
    assert len(train.prompts) < 400  # some were dropped as test duplicates
    other, _ = sg.make_splits(cfg, train=400, test=100, seed=4)
    assert not np.array_equal(other.prompts[:50], train.prompts[:50])


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer

    cfg = sg.GraphConfig(3, 4, 20)
    train, _ = sg.make_splits(cfg, train=20, test=5, seed=0)
    tok = AutoTokenizer.from_pretrained(sg.save_tokenizer(cfg, tmp_path))
    vocab = sg.Vocabulary(cfg.num_nodes)
    assert (tok.eos_token_id, tok.pad_token_id, len(tok)) == (vocab.eos, vocab.pad, vocab.size)
    for p, a in zip(train.prompts, train.answers):
        ids = np.concatenate([p, a])
        text = vocab.decode(ids)
        assert tok(text)["input_ids"] == ids.tolist()
        assert tok.decode(ids).replace(" ", "") == text


def test_score_whole_path_and_first_step():
    cfg = sg.GraphConfig(2, 4, 20)
    vocab = sg.Vocabulary(20)
    answer = sg.encode_answers(cfg, np.array([[3, 7, 9, 11]]))[0]  # 3,7,9,11<eos>
    wrong_first = answer.copy()
    wrong_first[2] = 5
    wrong_last = answer.copy()
    wrong_last[6] = 5
    no_eos = answer.copy()
    no_eos[7] = vocab.comma  # text after the path
    short = answer[:5]
    garbage = np.full(8, vocab.bar)
    completions = np.full((6, 9), vocab.pad)
    for i, c in enumerate([answer, wrong_first, wrong_last, no_eos, garbage]):
        completions[i, : len(c)] = c
    completions[5, :5] = short
    reward, first = sg.score(cfg, np.tile(answer, (6, 1)), completions)
    np.testing.assert_array_equal(reward, [1, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(first, [1, 0, 1, 1, 0, 1])
    # tokens after EOS (mask False) are ignored; a path that fills the completion exactly counts
    masked = completions[:1].copy()
    masked[0, 8] = 3
    assert sg.score(cfg, answer[None], masked, np.arange(9)[None] < 8)[0][0] == 1
    assert sg.score(cfg, answer[None], answer[None, :7])[0][0] == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(degree=0), "degree must be >= 1"),
    (dict(path_length=1), "path_length"),
    (dict(degree=5, path_length=12, num_nodes=50), r"needs degree·\(path_length−1\)\+1 = 56"),
])
def test_impossible_graphs_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sg.GraphConfig(**kwargs)


def test_bad_prompts_are_refused():
    cfg = sg.GraphConfig(2, 4, 20)
    train, _ = sg.make_splits(cfg, train=4, test=2, seed=0)
    with pytest.raises(ValueError, match=r"prompts must be \[n, 28\]"):
        sg.paths_from_prompts(cfg, train.prompts[:, :-1])
    broken = train.prompts.copy()
    broken[1, -2] = broken[1, -4]  # goal := source: no 4-node path
    with pytest.raises(ValueError, match="prompt 1 has no 4-node path"):
        sg.paths_from_prompts(cfg, broken)


def test_task_reward_reads_the_prompt():
    cfg = sg.GraphConfig(3, 5, 30)
    train, test = sg.make_splits(cfg, train=50, test=10, seed=1)
    task = sg.StarGraphTask(cfg, train, test)
    prompts, mask = task.sample_prompts(np.random.default_rng(0), 8)
    answers = sg.encode_answers(cfg, sg.paths_from_prompts(cfg, prompts))
    good = np.ones(answers.shape, bool)
    np.testing.assert_array_equal(task.reward(prompts, answers, good), 1.0)
    answers[::2, 4] = (answers[::2, 4] + 1) % 30
    np.testing.assert_array_equal(task.reward(prompts, answers, good), [0, 1] * 4)
