"""Star-graph path finding (Bachmann & Nagarajan 2024; the Q♯ paper's first experiment).

A star graph has a centre (the source) and ``degree`` arms; every source-to-leaf path has
``path_length`` nodes including the source, and the ``degree·(path_length−1)+1`` labels are drawn
from ``num_nodes``. The prompt lists the shuffled edges, then the source and the goal (a leaf):

    ``a,b|c,d|…|y,z/src,goal=``      answer: ``src,n1,…,goal`` then EOS

This module is the task: graphs, their encoding, the reward and a tokenizer. The paper's
six-method comparison on it lives in ``experiments/star_graph/``.

Every token is a node label or one of ``, | / =`` or EOS/PAD, so prompts have one fixed length
``4·edges + 4`` and answers ``2·path_length`` tokens (EOS included). Next-token training learns a
"Clever Hans" shortcut: after the first step each next node is the unique successor of the
current one, but the first step from the source needs planning, so it is right ≈ 1/degree of the
time.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

COMMA, BAR, SLASH, EQUALS, EOS, PAD = ",", "|", "/", "=", "<eos>", "<pad>"


@dataclasses.dataclass(frozen=True)
class GraphConfig:
    """Shape of the star graphs: G(degree, path_length) over ``num_nodes`` labels.

    Fields: degree (arms from the source; paper: 2, 5, 3), path_length (nodes on a source-to-leaf
    path, source included; paper: 5, 5, 8), num_nodes (the label alphabet; paper: 50).
    """

    degree: int = 2
    path_length: int = 5
    num_nodes: int = 50

    def __post_init__(self):
        if self.degree < 1:
            raise ValueError(f"degree must be >= 1, got {self.degree}")
        if self.path_length < 2:
            raise ValueError(f"path_length (nodes on a source-to-leaf path, source included) must be >= 2, "
                             f"got {self.path_length}")
        if self.nodes_per_graph > self.num_nodes:
            raise ValueError(
                f"G({self.degree}, {self.path_length}) needs degree·(path_length−1)+1 = {self.nodes_per_graph} "
                f"distinct labels but num_nodes={self.num_nodes}; raise num_nodes or shrink the graph"
            )

    @property
    def nodes_per_graph(self) -> int:
        return self.degree * (self.path_length - 1) + 1

    @property
    def num_edges(self) -> int:
        return self.degree * (self.path_length - 1)

    @property
    def prompt_length(self) -> int:
        return 4 * self.num_edges + 4  # "a,b|" per edge less the last "|", then "/src,goal="

    @property
    def answer_length(self) -> int:
        return 2 * self.path_length  # nodes, commas between them, EOS


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Token ids: node labels ``0..num_nodes−1`` are their own ids, then the specials."""

    num_nodes: int

    @property
    def comma(self) -> int:
        return self.num_nodes

    @property
    def bar(self) -> int:
        return self.num_nodes + 1

    @property
    def slash(self) -> int:
        return self.num_nodes + 2

    @property
    def equals(self) -> int:
        return self.num_nodes + 3

    @property
    def eos(self) -> int:
        return self.num_nodes + 4

    @property
    def pad(self) -> int:
        return self.num_nodes + 5

    @property
    def size(self) -> int:
        return self.num_nodes + 6

    def tokens(self) -> list[str]:
        return [str(i) for i in range(self.num_nodes)] + [COMMA, BAR, SLASH, EQUALS, EOS, PAD]

    def decode(self, ids) -> str:
        names = self.tokens()
        return "".join(names[i] for i in np.asarray(ids).ravel() if i != self.pad)


@dataclasses.dataclass(frozen=True)
class Graphs:
    """A batch of star graphs.

    Attributes:
      edges: int ``[n, edges, 2]`` in prompt order; source, goal: int ``[n]``;
      path: int ``[n, path_length]`` the source-to-goal path; arms: int ``[n, degree, path_length]``
        every arm (arms[:, :, 0] is the source).
    """

    edges: np.ndarray
    source: np.ndarray
    goal: np.ndarray
    path: np.ndarray
    arms: np.ndarray

    def __len__(self) -> int:
        return len(self.source)

    def take(self, rows) -> "Graphs":
        """The graphs at ``rows`` (indices, a slice or a mask)."""
        return Graphs(*(getattr(self, f.name)[rows] for f in dataclasses.fields(Graphs)))


def sample_graphs(cfg: GraphConfig, n: int, rng: np.random.Generator) -> Graphs:
    """``n`` random star graphs: labels without repeats, the goal's arm at a random index, edges shuffled."""
    if n < 1:
        raise ValueError(f"need at least one graph, got n={n}")
    d, length = cfg.degree, cfg.path_length
    labels = np.argsort(rng.random((n, cfg.num_nodes)), axis=1)[:, : cfg.nodes_per_graph]  # distinct per graph
    source = labels[:, 0]
    arms = np.concatenate([np.repeat(source[:, None, None], d, axis=1),
                           labels[:, 1:].reshape(n, d, length - 1)], axis=2)  # [n, d, L]
    goal_arm = rng.integers(0, d, size=n)
    path = arms[np.arange(n), goal_arm]
    edges = np.stack([arms[:, :, :-1], arms[:, :, 1:]], axis=-1).reshape(n, cfg.num_edges, 2)
    order = np.argsort(rng.random((n, cfg.num_edges)), axis=1)
    edges = np.take_along_axis(edges, order[:, :, None], axis=1)
    return Graphs(edges=edges, source=source, goal=path[:, -1], path=path, arms=arms)


def encode_prompts(cfg: GraphConfig, graphs: Graphs) -> np.ndarray:
    """int32 ``[n, prompt_length]``: ``a,b|c,d|…/src,goal=``."""
    vocab = Vocabulary(cfg.num_nodes)
    n, e = len(graphs), cfg.num_edges
    per_edge = np.empty((n, e, 4), np.int64)
    per_edge[:, :, 0], per_edge[:, :, 1] = graphs.edges[:, :, 0], vocab.comma
    per_edge[:, :, 2], per_edge[:, :, 3] = graphs.edges[:, :, 1], vocab.bar
    body = per_edge.reshape(n, 4 * e)[:, :-1]
    tail = np.stack([np.full(n, vocab.slash), graphs.source, np.full(n, vocab.comma), graphs.goal,
                     np.full(n, vocab.equals)], axis=1)
    return np.concatenate([body, tail], axis=1).astype(np.int32)


def encode_answers(cfg: GraphConfig, path: np.ndarray) -> np.ndarray:
    """int32 ``[n, answer_length]``: ``src,n1,…,goal<eos>`` for paths ``[n, path_length]``."""
    vocab = Vocabulary(cfg.num_nodes)
    n = len(path)
    out = np.full((n, cfg.answer_length), vocab.comma, np.int64)
    out[:, 0:-1:2] = path
    out[:, -1] = vocab.eos
    return out.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Split:
    """Encoded graphs: prompts ``[n, P]``, answers ``[n, A]`` and the graphs themselves."""

    prompts: np.ndarray
    answers: np.ndarray
    graphs: Graphs

    def take(self, rows) -> "Split":
        """The graphs at ``rows`` (indices, a slice or a mask)."""
        return Split(self.prompts[rows], self.answers[rows], self.graphs.take(rows))


def make_splits(cfg: GraphConfig, *, train: int, test: int, seed: int) -> tuple[Split, Split]:
    """Deterministic train / test splits from ``seed``; no test prompt occurs in the train split.

    (Paper: 200k train, 20k test.)
    """
    rng = np.random.default_rng([seed, cfg.degree, cfg.path_length, cfg.num_nodes])
    test_graphs = sample_graphs(cfg, test, rng)
    test_prompts = encode_prompts(cfg, test_graphs)
    seen = {p.tobytes() for p in test_prompts}
    train_graphs = sample_graphs(cfg, train, rng)
    train_prompts = encode_prompts(cfg, train_graphs)
    fresh = np.array([p.tobytes() not in seen for p in train_prompts], bool)
    if not fresh.all():  # astronomically rare at paper sizes; possible for tiny graphs
        keep = np.flatnonzero(fresh)
        train_graphs = train_graphs.take(keep)
        train_prompts = train_prompts[keep]
    return (Split(train_prompts, encode_answers(cfg, train_graphs.path), train_graphs),
            Split(test_prompts, encode_answers(cfg, test_graphs.path), test_graphs))


def score(cfg: GraphConfig, answers: np.ndarray, completions: np.ndarray, mask: np.ndarray | None = None
          ) -> tuple[np.ndarray, np.ndarray]:
    """Whole-path and first-step correctness of completions.

    Args:
      answers: int ``[n, answer_length]`` (from :func:`encode_answers`).
      completions: int ``[n, N]`` generated tokens; ``mask`` bool ``[n, N]`` False after EOS
        (tokens there are ignored). Anything malformed — a wrong or missing token, text after the
        path, a completion shorter than the path — scores 0; nothing raises.

    Returns:
      float32 ``(reward [n], first_step [n])``: reward 1 iff the completion is exactly the path
      ``src,…,goal`` followed by EOS (or ending there); first_step 1 iff the node after the source
      is right.
    """
    answers, completions = np.asarray(answers), np.asarray(completions)
    n, width = completions.shape
    vocab = Vocabulary(cfg.num_nodes)
    if mask is not None:
        completions = np.where(np.asarray(mask, bool), completions, vocab.pad)
    body = cfg.answer_length - 1  # path and commas, without EOS
    padded = np.full((n, max(width, cfg.answer_length)), vocab.pad, np.int64)
    padded[:, :width] = completions
    path_ok = np.all(padded[:, :body] == answers[:, :body], axis=1)
    ends = (padded[:, body] == vocab.eos) | ((padded[:, body] == vocab.pad) & (width == body))
    first = np.all(padded[:, :3] == answers[:, :3], axis=1)
    return (path_ok & ends).astype(np.float32), first.astype(np.float32)


def save_tokenizer(cfg: GraphConfig, directory: str | Path) -> Path:
    """Write a Hugging Face tokenizer for this vocabulary (``AutoTokenizer.from_pretrained(dir)``).

    It maps the text format to exactly the ids of :func:`encode_prompts` / :func:`encode_answers`.
    """
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = Vocabulary(cfg.num_nodes)
    names = vocab.tokens()
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(names)}, unk_token=PAD))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"<eos>|<pad>|\d+|[,|/=]"), behavior="isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=EOS, pad_token=PAD, unk_token=PAD)
    directory = Path(directory)
    tok.save_pretrained(directory)
    (directory / "star_graph.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    return directory


def edges_of(cfg: GraphConfig, prompts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The edge list of each prompt: heads and tails int ``[n, edges]``, in prompt order."""
    if prompts.ndim != 2 or prompts.shape[1] != cfg.prompt_length:
        raise ValueError(f"prompts must be [n, {cfg.prompt_length}] for G({cfg.degree}, {cfg.path_length}), "
                         f"got shape {prompts.shape}")
    return prompts[:, 0 : 4 * cfg.num_edges : 4], prompts[:, 2 : 4 * cfg.num_edges : 4]


def paths_from_prompts(cfg: GraphConfig, prompts: np.ndarray) -> np.ndarray:
    """int ``[n, path_length]``: the source-to-goal path read off each prompt's edge list.

    The reward needs nothing but the prompt, like any task of the driver. A prompt whose edges do
    not lead from the source to the goal in ``path_length − 1`` steps raises (it was not made by
    :func:`encode_prompts` for this ``cfg``).
    """
    prompts = np.asarray(prompts)
    heads, tails = edges_of(cfg, prompts)
    n = len(prompts)
    source, goal = prompts[:, -4], prompts[:, -2]
    pred = np.full((n, Vocabulary(cfg.num_nodes).size), -1, np.int64)
    pred[np.arange(n)[:, None], tails] = heads
    path = np.empty((n, cfg.path_length), np.int64)
    path[:, -1] = goal
    for i in range(cfg.path_length - 2, -1, -1):
        path[:, i] = pred[np.arange(n), np.maximum(path[:, i + 1], 0)]
    if not np.all(path[:, 0] == source):
        bad = int(np.flatnonzero(path[:, 0] != source)[0])
        raise ValueError(f"prompt {bad} has no {cfg.path_length}-node path from its source to its goal: "
                         f"{Vocabulary(cfg.num_nodes).decode(prompts[bad])}")
    return path


@dataclasses.dataclass(frozen=True)
class StarGraphTask:
    """Algorithm 1's task (:class:`qsharp_jax.tasks.Task`): prompts from a train split, evaluation on
    (a slice of) the test split, reward 1 iff the whole path is right."""

    cfg: GraphConfig
    train: Split
    test: Split
    eval_size: int = 512  # per-iteration evaluation of the driver; an experiment may evaluate all of test
    reward_range: tuple[float, float] = (0.0, 1.0)

    @classmethod
    def make(cls, cfg: GraphConfig = GraphConfig(), *, train: int = 200_000, test: int = 20_000, seed: int = 0,
             eval_size: int = 512) -> "StarGraphTask":
        """The task on fresh splits (:func:`make_splits`; paper sizes by default)."""
        train_split, test_split = make_splits(cfg, train=train, test=test, seed=seed)
        return cls(cfg, train_split, test_split, eval_size)

    @property
    def eos_id(self) -> int:
        return Vocabulary(self.cfg.num_nodes).eos

    @property
    def pad_id(self) -> int:
        return Vocabulary(self.cfg.num_nodes).pad

    @property
    def vocab_size(self) -> int:
        return Vocabulary(self.cfg.num_nodes).size

    def sample_prompts(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        return self.sample_prompt_rows(rng, n, np.arange(n))

    def sample_prompt_rows(self, rng: np.random.Generator, n: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if n < 1:
            raise ValueError(f"need at least one prompt per iteration, got {n}")
        index = rng.integers(0, len(self.train.prompts), size=n)[rows]
        return self.train.prompts[index], np.ones((len(index), self.cfg.prompt_length), bool)

    def eval_prompts(self) -> tuple[np.ndarray, np.ndarray]:
        prompts = self.test.prompts[: self.eval_size]
        return prompts, np.ones(prompts.shape, bool)

    def reward(self, prompts: np.ndarray, completions: np.ndarray, mask: np.ndarray) -> np.ndarray:
        answers = encode_answers(self.cfg, paths_from_prompts(self.cfg, prompts))
        return score(self.cfg, answers, completions, mask)[0]
