"""Straightforward reference implementations the tests compare the fast code against."""
import math


def reference_loss(center_table, context_table, center_ids, context_ids, neg_ids):
    """The mean SGNS loss written out pair by pair from per-word vectors, in float64."""
    total = 0.0
    for b in range(len(center_ids)):
        c = center_table[center_ids[b]]
        total -= math.log(1 / (1 + math.exp(-float(c @ context_table[context_ids[b]]))))
        for n in neg_ids[b]:
            total -= math.log(1 / (1 + math.exp(float(c @ context_table[n]))))
    return total / len(center_ids)
