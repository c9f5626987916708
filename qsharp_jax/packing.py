"""Packed value-model fitting: rows of a fit (prompt + response, left padded) packed end to end into
sequences of a fixed length with segment ids, so a batch trains on tokens, not on padding.

Each packed sequence holds whole rows (none is split), found by best-fit decreasing over the rows'
real-token counts; the model keeps every row to itself (:meth:`Transformer.hidden`'s
``segment_ids``: attention, positions and token shift within a row), and each token carries its
row's return, so the loss over a packed batch equals the loss over the same rows padded.

With ``groups`` (the rows sampled from one prompt share a group), a group's common beginning — its
prompt, up to the first token any of its rows fits — is laid out once and its rows' remainders
after it as branches (``branch_ids``), each seeing the prefix and itself only: the prompt's tokens
are encoded once for all its answers, and every fitted token still has its row's exact context.
"""

from __future__ import annotations

import numpy as np

# what a train step reads of pack_rows' output (``rows`` is for tracing a token back to its row)
BATCH_KEYS = ("tokens", "attention_mask", "loss_mask", "returns", "segment_ids")
SHARED_BATCH_KEYS = BATCH_KEYS + ("branch_ids",)  # pack_rows(..., groups=...)'s


def pack_rows(data: dict[str, np.ndarray], length: int, groups: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Pack a fit's rows into ``[M, length]`` sequences.

    Args:
      data: ``tokens`` int ``[N, T]``, ``attention_mask`` bool ``[N, T]`` (the real tokens, in
        order; padding anywhere), ``loss_mask`` bool ``[N, T]``, and ``rewards`` float ``[N]``
        (one return per row) or ``returns`` float ``[N, T]`` (one per token).
      length: tokens per packed sequence; every row's real tokens must fit.
      groups: int ``[N]`` or None: rows of one group (the samples of one prompt) share their common
        beginning, laid out once (see the module docstring); a group too long for one sequence is
        split into parts that fit. Only for a model whose states at a token depend on the tokens
        up to it alone (V-type: a Q-type model reads a token's value at the token before it).

    Returns:
      ``tokens`` int32, ``attention_mask``, ``loss_mask`` bool, ``returns`` float32 and
      ``segment_ids`` int32 (1, 2, ... per row — with groups, per group part — within a sequence;
      0 on the padding after them), all ``[M, length]``, and ``rows`` int64 ``[M, length]``: each
      token's row in ``data`` (-1: padding; a shared prefix: its first row). With groups also
      ``branch_ids`` int32 ``[M, length]``: 0 on a shared prefix, 1, 2, ... on its rows' remainders.

    Raises ValueError for a row longer than ``length`` (naming it), or mismatched arrays.
    """
    tokens, mask, loss_mask = (np.asarray(data[k]) for k in ("tokens", "attention_mask", "loss_mask"))
    mask = mask.astype(bool)
    if tokens.ndim != 2 or mask.shape != tokens.shape or loss_mask.shape != tokens.shape:
        raise ValueError(f"tokens, attention_mask and loss_mask must share [N, T]; got {tokens.shape}, {mask.shape}, "
                         f"{loss_mask.shape}")
    if "returns" in data:
        returns = np.asarray(data["returns"], np.float32)
    else:
        returns = np.broadcast_to(np.asarray(data["rewards"], np.float32)[:, None], tokens.shape)
    if returns.shape != tokens.shape:
        raise ValueError(f"rewards must be [N] or returns [N, T] for tokens {tokens.shape}; got {returns.shape}")
    if length < 1:
        raise ValueError(f"pack length must be >= 1, got {length}")
    lengths = mask.sum(axis=1)
    if lengths.size and lengths.max() > length:
        row = int(np.argmax(lengths))
        raise ValueError(f"row {row} has {lengths[row]} tokens, more than the pack length {length}; raise the pack "
                         f"length to at least {lengths.max()} (the longest prompt + response) or turn packing off")
    real = [(tokens[r][mask[r]], loss_mask[r][mask[r]], returns[r][mask[r]]) for r in range(len(tokens))]
    if groups is None:
        items = [(0, [r]) for r in range(len(tokens))]  # (shared prefix length, rows)
    else:
        groups = np.asarray(groups)
        if groups.shape != lengths.shape:
            raise ValueError(f"groups must be [N] = {lengths.shape}, got {groups.shape}")
        items = [item for g in np.unique(groups) for item in _trees(np.flatnonzero(groups == g), real, length)]
    sizes = np.array([shared + sum(int(lengths[r]) - shared for r in rows) for shared, rows in items], np.int64)
    packs = _best_fit_decreasing(sizes, length)
    shape = (len(packs), length)
    out = {"tokens": np.zeros(shape, np.int32), "attention_mask": np.zeros(shape, bool),
           "loss_mask": np.zeros(shape, bool), "returns": np.zeros(shape, np.float32),
           "segment_ids": np.zeros(shape, np.int32), "rows": np.full(shape, -1, np.int64)}
    if groups is not None:
        out["branch_ids"] = np.zeros(shape, np.int32)
    for p, members in enumerate(packs):
        at = 0
        for segment, item in enumerate(members, start=1):
            shared, rows = items[item]
            pieces = [(rows[0], slice(0, shared), 0)] if shared else []  # (row, its real tokens, branch)
            pieces += [(r, slice(shared, int(lengths[r])), b) for b, r in enumerate(rows, start=1)]
            for r, part, branch in pieces:
                ids, fit, ret = (x[part] for x in real[r])
                where = slice(at, at + len(ids))
                out["tokens"][p, where], out["loss_mask"][p, where] = ids, fit
                out["returns"][p, where], out["attention_mask"][p, where] = ret, True
                out["segment_ids"][p, where], out["rows"][p, where] = segment, r
                if groups is not None:
                    out["branch_ids"][p, where] = branch
                at += len(ids)
    return out


def _trees(rows: np.ndarray, real: list, length: int) -> list[tuple[int, list[int]]]:
    """A group's rows as ``(shared, rows)`` items of at most ``length`` tokens: their longest common
    beginning (no fitted token in it, and at least one token of each row after it) once, then each
    row's rest; rows that do not fit go to further items with the same prefix."""
    seqs = [real[r][0] for r in rows]
    shortest = min(len(x) for x in seqs)
    shared = shortest - 1  # every branch keeps a token
    for r, x in zip(rows, seqs):
        fitted = np.flatnonzero(real[r][1][:shared])
        differs = np.flatnonzero(x[:shared] != seqs[0][:shared])
        shared = min([shared, *fitted[:1], *differs[:1]])
    if len(rows) == 1 or shared <= 0:
        return [(0, [int(r)]) for r in rows]
    items, used = [], length
    for r, x in sorted(zip(rows, seqs), key=lambda rx: -len(rx[1])):
        rest = len(x) - shared
        if used + rest > length:
            items.append((shared, []))
            used = shared
        items[-1][1].append(int(r))
        used += rest
    return [(s, sorted(rs)) if len(rs) > 1 else (0, rs) for s, rs in items]


def _best_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Rows (longest first) into bins of ``capacity`` tokens, each into the fullest bin it fits."""
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]  # room left -> bins with that much room
    has_room = np.zeros(capacity + 1, bool)
    bins: list[list[int]] = []
    for r in np.argsort(-lengths, kind="stable"):
        need = int(lengths[r])
        fits = np.flatnonzero(has_room[need:])
        if fits.size:
            room = need + int(fits[0])
            b = by_room[room].pop()
            has_room[room] = bool(by_room[room])
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(int(r))
        by_room[room - need].append(b)
        has_room[room - need] = True
    return bins
