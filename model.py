"""SGNS model: center and context embedding tables, the SGNS loss and its sparse gradients."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class SGNS(nn.Module):
    """Skip-gram with negative sampling (Mikolov et al. 2013).

    in_embed holds the center vectors (the embeddings users take away), out_embed the
    context vectors. Initialised as word2vec: centers uniform in +-0.5/d, contexts zero.
    """

    def __init__(self, vocab_size, embed_size, sparse=True):
        super().__init__()
        self.vocab_size, self.embed_size = vocab_size, embed_size
        self.in_embed = nn.Embedding(vocab_size, embed_size, sparse=sparse)
        self.out_embed = nn.Embedding(vocab_size, embed_size, sparse=sparse)
        with torch.no_grad():
            self.in_embed.weight.uniform_(-0.5 / embed_size, 0.5 / embed_size)
            self.out_embed.weight.zero_()

    def forward(self, center_ids, context_ids, neg_ids):
        """Mean SGNS loss over the pairs: -log s(c.o) - sum_k log s(-c.n_k)."""
        center = self.in_embed(center_ids)                    # B x d
        context = self.out_embed(context_ids)                 # B x d
        negatives = self.out_embed(neg_ids)                   # B x K x d
        pos_score = (center * context).sum(-1)
        neg_score = torch.bmm(negatives, center.unsqueeze(2)).squeeze(2)
        loss = -F.logsigmoid(pos_score) - F.logsigmoid(-neg_score).sum(-1)
        return loss.mean()

    def embeddings(self):
        """The V x d center vectors."""
        return self.in_embed.weight.detach()

    @torch.no_grad()
    def sparse_grads(self, center_ids, context_ids, neg_ids):
        """Loss summed over the pairs and its gradient as touched rows, without autograd.

        Returns (loss_sum, in_rows, in_grads, out_rows, out_grads): the gradient of the
        summed loss is in_grads scattered (added) into in_embed rows in_rows, and likewise
        for out_embed. Rows may repeat; index_add_ sums them.
        """
        in_w, out_w = self.in_embed.weight, self.out_embed.weight
        center = in_w[center_ids]                             # B x d
        context = out_w[context_ids]                          # B x d
        negatives = out_w[neg_ids]                            # B x K x d
        pos_score = (center * context).sum(-1)
        neg_score = torch.bmm(negatives, center.unsqueeze(2)).squeeze(2)
        loss_sum = -(F.logsigmoid(pos_score).sum() + F.logsigmoid(-neg_score).sum())
        pos_coef = torch.sigmoid(pos_score) - 1.0             # d loss / d score, positive pair
        neg_coef = torch.sigmoid(neg_score)                   # d loss / d score, negatives
        center_grad = pos_coef.unsqueeze(1) * context + torch.bmm(neg_coef.unsqueeze(1), negatives).squeeze(1)
        context_grad = pos_coef.unsqueeze(1) * center
        neg_grad = neg_coef.unsqueeze(2) * center.unsqueeze(1)
        out_rows = torch.cat([context_ids, neg_ids.reshape(-1)])
        out_grads = torch.cat([context_grad, neg_grad.reshape(-1, self.embed_size)])
        return loss_sum, center_ids, center_grad, out_rows, out_grads

    @torch.no_grad()
    def apply_sparse_grads(self, in_rows, in_grads, out_rows, out_grads, lr):
        """Plain SGD on the touched rows only."""
        self.in_embed.weight.index_add_(0, in_rows, in_grads, alpha=-lr)
        self.out_embed.weight.index_add_(0, out_rows, out_grads, alpha=-lr)


def build_model(model_name, vocab_size, embed_size, sparse=True, **kwargs):
    """The model a run asks for, by name."""
    if model_name == "sgns":
        return SGNS(vocab_size, embed_size, sparse=sparse)
    raise ValueError(f"unknown model name {model_name!r}")


def model_from_checkpoint(ckpt):
    """Rebuild the trained model held by a checkpoint dict (loaded with weights_only=True)."""
    args = ckpt["args"]
    model = build_model(ckpt["model_name"], len(ckpt["words"]), args["embed_size"], words=ckpt["words"], args=args)
    model.load_state_dict(ckpt["model"])
    return model.eval()
