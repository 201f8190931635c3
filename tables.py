"""SGNS's two tables as numpy arrays, and what the modules that train a model share before torch loads.

The compiled CPU loop on one process trains a Tables: two float32 arrays and nothing of torch,
whose import takes longer than training a small corpus (lazy.py). Every other loop trains
model.SGNS or model.RNNSGNS, which hold torch tensors. A Tables' state dict has model.SGNS's
keys, so a checkpoint of either loads into the other.
"""
import numpy as np

# A row's key (in_embed rows 0..V-1, out_embed rows V..2V-1) travels in two float32 columns,
# key // KEY_SPLIT and key % KEY_SPLIT, both exact: one float32 array holds gradients and keys.
KEY_SPLIT = 4096
# Defaults of the RNN flags, shared by the CLI and by checkpoints whose args lack a flag.
RNN_DEFAULTS = {"char_embed_size": 32, "hidden_size": 32, "num_layer": 1, "dropout": 0.0,
                "bidirectional": True, "mlp_size": None, "rnn_cell": "lstm"}


class Tables:
    """SGNS as numpy tables: in_weight holds the center vectors (the embeddings users take away),
    out_weight the context vectors, each V x d float32. Initialised as word2vec and as
    model.SGNS: centers uniform in +-0.5/d (drawn from the seed), contexts zero."""

    def __init__(self, vocab_size, embed_size, seed):
        self.vocab_size, self.embed_size = vocab_size, embed_size
        self.in_weight = np.random.default_rng(seed).random((vocab_size, embed_size), dtype=np.float32)
        self.in_weight -= 0.5  # drawn and shifted in float32: no V x d float64 draw on the way
        self.in_weight /= embed_size
        self.out_weight = np.zeros((vocab_size, embed_size), dtype=np.float32)

    def state_dict(self):
        return {"in_embed.weight": self.in_weight, "out_embed.weight": self.out_weight}

    def load_state_dict(self, state_dict):
        """The weights of a state dict (numpy arrays or torch tensors) copied in; raises
        RuntimeError, as torch's modules do, for missing keys or other shapes."""
        own = self.state_dict()
        if set(state_dict) != set(own):
            raise RuntimeError(f"the weights are {sorted(state_dict)}, not {sorted(own)}")
        given = {name: np.asarray(state_dict[name]) for name in own}
        for name, weight in own.items():
            if given[name].shape != weight.shape:
                raise RuntimeError(f"size mismatch for {name}: {tuple(given[name].shape)} given, "
                                   f"{tuple(weight.shape)} in this model")
        for name, weight in own.items():
            weight[...] = given[name]

    def parameters(self):
        return [self.in_weight, self.out_weight]

    def embeddings(self):
        """The V x d center vectors, contiguous (the CPU kernel's tables space their rows out)."""
        return np.ascontiguousarray(self.in_weight)

    def to(self, device):
        """The tables live on the host: the compiled loop trains them there."""
        return self


def parameter_count(model_name, words, embed_size, args=None):
    """How many parameters a run's model has for this vocabulary, counted without allocating them."""
    if model_name != "rnn":
        return 2 * len(words) * embed_size
    import model  # the rnn model's encoder: torch
    return model.rnn_parameter_count(words, embed_size, args)
