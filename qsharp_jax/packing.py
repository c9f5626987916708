"""Packed value-model fitting: rows of a fit (prompt + response, left padded) packed end to end into
sequences of a fixed length with segment ids, so a batch trains on tokens, not on padding.

Each packed sequence holds whole rows (none is split), found by best-fit decreasing over the rows'
real-token counts; the model keeps every row to itself (:meth:`Transformer.hidden`'s
``segment_ids``: attention, positions and token shift within a row), and each token carries its
row's return, so the loss over a packed batch equals the loss over the same rows padded.
"""

from __future__ import annotations

import numpy as np

# what a train step reads of pack_rows' output (``rows`` is for tracing a token back to its row)
BATCH_KEYS = ("tokens", "attention_mask", "loss_mask", "returns", "segment_ids")


def pack_rows(data: dict[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
    """Pack a fit's rows into ``[M, length]`` sequences.

    Args:
      data: ``tokens`` int ``[N, T]``, ``attention_mask`` bool ``[N, T]`` (the real tokens, in
        order; padding anywhere), ``loss_mask`` bool ``[N, T]``, and ``rewards`` float ``[N]``
        (one return per row) or ``returns`` float ``[N, T]`` (one per token).
      length: tokens per packed sequence; every row's real tokens must fit.

    Returns:
      ``tokens`` int32, ``attention_mask``, ``loss_mask`` bool, ``returns`` float32 and
      ``segment_ids`` int32 (1, 2, ... per row within a sequence; 0 on the padding after them),
      all ``[M, length]``, and ``rows`` int64 ``[M, length]``: each token's row in ``data`` (-1: padding).

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
    packs = _best_fit_decreasing(lengths, length)
    out = {"tokens": np.zeros((len(packs), length), np.int32), "attention_mask": np.zeros((len(packs), length), bool),
           "loss_mask": np.zeros((len(packs), length), bool), "returns": np.zeros((len(packs), length), np.float32),
           "segment_ids": np.zeros((len(packs), length), np.int32), "rows": np.full((len(packs), length), -1, np.int64)}
    for p, rows in enumerate(packs):
        at = 0
        for segment, r in enumerate(rows, start=1):
            real = mask[r]
            n = int(lengths[r])
            where = slice(at, at + n)
            out["tokens"][p, where], out["loss_mask"][p, where] = tokens[r][real], loss_mask[r][real]
            out["returns"][p, where], out["attention_mask"][p, where] = returns[r][real], True
            out["segment_ids"][p, where], out["rows"][p, where] = segment, r
            at += n
    return out


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
