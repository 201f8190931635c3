"""A straightforward re-implementation of the original sgns_pytorch's SPPMI method, for timing only.

The seed filled a dense V x V co-occurrence array with nested Python loops over every
(center, context) pair of every sentence, then computed PMI densely over all V^2 cells.
This mirrors that approach (same window and boundary rules as pip_loss.sppmi, so results
can be compared) without any of the vectorisation.
"""
import numpy as np


def seed_sppmi_dense(token_ids, sentence_starts, vocab_size, window, neg):
    """Dense V x V SPPMI array, computed the original sgns_pytorch's way (Python loops, dense arithmetic)."""
    counts = np.zeros((vocab_size, vocab_size), dtype=np.float64)
    ids = token_ids.tolist()
    bounds = list(sentence_starts) + [len(ids)]
    for s in range(len(bounds) - 1):
        sentence = ids[bounds[s]:bounds[s + 1]]
        for i, center in enumerate(sentence):
            if center >= vocab_size:
                continue
            for j in range(max(0, i - window), min(len(sentence), i + window + 1)):
                if j != i and sentence[j] < vocab_size:
                    counts[center, sentence[j]] += 1
    total = counts.sum()
    row = counts.sum(axis=1, keepdims=True)
    col = counts.sum(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(counts * total / (row * col))
    pmi[~np.isfinite(pmi)] = 0.0
    return np.maximum(pmi - np.log(neg), 0.0)
