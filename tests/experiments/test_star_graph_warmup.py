"""The star-graph value warm-up's edge walks: labels against the graphs' own edge sets."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from experiments.star_graph.warmup import edge_walks
from qsharp_jax.tasks import star_graph as sg


@settings(max_examples=20, deadline=None)
@given(degree=st.integers(1, 4), length=st.integers(2, 5), seed=st.integers(0, 2**16))
def test_edge_walks_label_each_step_by_the_prompts_edges(degree, length, seed):
    cfg = sg.GraphConfig(degree, length, 30)
    graphs = sg.sample_graphs(cfg, 64, np.random.default_rng(seed))
    prompts = sg.encode_prompts(cfg, graphs)
    out = edge_walks(cfg, prompts, np.random.default_rng(seed + 1))
    p, t = cfg.prompt_length, cfg.prompt_length + 2 * length - 1
    assert {k: v.shape for k, v in out.items()} == {k: (64, t) for k in ("tokens", "attention_mask", "loss_mask", "returns")}
    np.testing.assert_array_equal(out["tokens"][:, :p], prompts)
    assert out["attention_mask"].all()
    walk = out["tokens"][:, p::2]  # x1..xL; commas between them
    assert (out["tokens"][:, p + 1 :: 2] == sg.Vocabulary(30).comma).all()
    for i in range(64):  # brute force against the graph's own edge set, not the prompt parser
        edges = {tuple(e) for e in graphs.edges[i]}
        nodes = {int(x) for e in edges for x in e}
        assert set(walk[i].tolist()) <= nodes
        labelled = np.flatnonzero(out["loss_mask"][i])
        np.testing.assert_array_equal(labelled, p + 2 * np.arange(1, length))
        expected = [float((int(walk[i, j - 1]), int(walk[i, j])) in edges) for j in range(1, length)]
        np.testing.assert_array_equal(out["returns"][i, labelled], expected)
        assert (out["returns"][i, ~out["loss_mask"][i]] == 0).all()


def test_edge_walks_follow_an_edge_about_half_the_time():
    cfg = sg.GraphConfig(2, 5, 50)
    prompts = sg.encode_prompts(cfg, sg.sample_graphs(cfg, 4000, np.random.default_rng(0)))
    out = edge_walks(cfg, prompts, np.random.default_rng(1))
    rate = out["returns"][out["loss_mask"]].mean()
    assert 0.3 < rate < 0.6  # 1/2 by following, plus random jumps that land on an edge; leaves have none
    with pytest.raises(ValueError, match="prompts must be"):
        edge_walks(cfg, prompts[:, :-1], np.random.default_rng(0))
