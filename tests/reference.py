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


def reference_window_gradient(in_w, out_w, in_ids, out_ids):
    """The summed SGNS loss of one window, each input row in_ids[j] against out_ids[0] (label 1) and
    out_ids[1:] (label 0), and its gradients with respect to the two tables, by autograd in float64."""
    import torch
    in_t = torch.tensor(in_w, dtype=torch.float64, requires_grad=True)
    out_t = torch.tensor(out_w, dtype=torch.float64, requires_grad=True)
    scores = in_t[torch.as_tensor(in_ids)] @ out_t[torch.as_tensor(out_ids)].T  # contexts x outputs
    logsigmoid = torch.nn.functional.logsigmoid
    loss = -logsigmoid(scores[:, 0]).sum() - logsigmoid(-scores[:, 1:]).sum()
    loss.backward()
    return loss.item(), in_t.grad.numpy(), out_t.grad.numpy()
