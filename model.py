"""SGNS models: embedding tables (SGNS) or character LSTM word encoders (RNNSGNS), with the SGNS loss."""
import contextlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from tables import KEY_SPLIT, RNN_DEFAULTS

# window_step: a row met more than this many times in one step (weighted by real pairs) moves by
# its mean gradient times this, not by the sum of all its gradients. The sum, computed from one
# stale vector, overshoots for the most frequent words and makes large batches diverge; the mean
# for every row starves the rare words. docs/design.md tells how the cap was chosen.
MAX_SUMMED_GRADIENTS = 32


@dataclass
class Rows:
    """A window step's gradient as rows, between its two phases (grads, then apply).

    packed: n x (d + 3) float32, each row [gradient | key // KEY_SPLIT | key % KEY_SPLIT | uses]
    (uses: the real pairs behind an in_embed row, the slots behind an out_embed row); a key may
    repeat (the rows of several ranks, or one row per slot). stats: [loss summed over the real
    pairs, their count]. segments: the (start, stop) ranges of packed that hold rows (None: all).
    """
    packed: torch.Tensor
    stats: object
    segments: object = None


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
        return _sgns_loss(self.in_embed(center_ids), self.out_embed(context_ids), self.out_embed(neg_ids))

    def embeddings(self):
        """The V x d center vectors, contiguous (the CPU kernel's tables space their rows out)."""
        return self.in_embed.weight.detach().contiguous()

    @torch.no_grad()
    def window_grads(self, context_ids, weight, out_ids, scratch=None):
        """Loss summed over the real pairs of whole windows, and its gradient as touched rows, without autograd.

        context_ids C x W2 with weight C x W2 (1 for a real pair, 0 for padding), out_ids
        C x (K+1): each window's center then its K negatives. As in word2vec, each context
        word's in-vector predicts the center's out-vector against the center's negatives, so
        a window is one product (W2 x d) by (d x (K+1)), batched over the C windows (Ji et al. 2016).
        Returns (loss_sum, in_rows, in_grads, out_rows, out_grads): the gradient is in_grads added
        (index_add_, rows may repeat) into in_embed rows in_rows, and likewise for out_embed.
        scratch(name, shape), if given (CPU), lends the float32 arrays the four C x . x d tensors
        are written to, kept from step to step (cpu_kernel.TouchedRows.scratch); the gradients
        returned then live there until the next call.
        """
        n_ctx, n_out, d = context_ids.numel(), out_ids.numel(), self.embed_size

        def lent(name, *shape):
            return None if scratch is None else torch.from_numpy(scratch(name, shape))
        # index_select gathers whole rows (as F.embedding does), where indexing the weight goes
        # element by element
        inputs = torch.index_select(self.in_embed.weight, 0, context_ids.reshape(-1),
                                    out=lent("inputs", n_ctx, d)).view(*context_ids.shape, d)    # C x W2 x d
        outputs = torch.index_select(self.out_embed.weight, 0, out_ids.reshape(-1),
                                     out=lent("outputs", n_out, d)).view(*out_ids.shape, d)     # C x (K+1) x d
        scores = torch.bmm(inputs, outputs.transpose(1, 2))              # C x W2 x (K+1)
        # 1 for the center, 0 for its negatives, made on the device (a CUDA graph cannot capture a host copy)
        labels = (torch.arange(out_ids.shape[1], device=scores.device) == 0).to(scores.dtype)
        pairs = weight.unsqueeze(2)
        # -log s(x) for the center, -log s(-x) for a negative, weighted by the pair's realness: one fused op
        loss_sum = F.binary_cross_entropy_with_logits(scores, labels.expand_as(scores), pairs, reduction="sum")
        coef = torch.sigmoid(scores).sub_(labels).mul_(pairs)            # d loss / d score: s(x) - label
        in_grads = torch.bmm(coef, outputs, out=lent("in_grads", *inputs.shape))                      # C x W2 x d
        out_grads = torch.bmm(coef.transpose(1, 2), inputs, out=lent("out_grads", *outputs.shape))   # C x (K+1) x d
        return loss_sum, context_ids.reshape(-1), in_grads.reshape(-1, d), out_ids.reshape(-1), out_grads.reshape(-1, d)

    @torch.no_grad()
    def window_step(self, context_ids, weight, out_ids, lr):
        """One SGD step on whole windows as tensor ops; returns [loss summed over the real pairs, their count].

        Every row moves by -lr times its summed gradient, scaled down where the row occurs more
        than MAX_SUMMED_GRADIENTS times (row_damping). lr is a number, or a 0-d tensor on the
        device (a captured CUDA graph reads it there). This is the step's reference form; the
        engines run it as compiled loops on the CPU and as Triton kernels on a GPU.
        """
        loss_sum, in_rows, in_grads, out_rows, out_grads = self.window_grads(context_ids, weight, out_ids)
        in_scale = self.row_damping(in_rows, weight.reshape(-1))
        out_scale = self.row_damping(out_rows, torch.ones_like(out_rows, dtype=in_grads.dtype))
        if torch.is_tensor(lr):  # folded into the per-row factors: no extra pass over the gradients
            in_scale, out_scale, lr = in_scale * lr, out_scale * lr, 1.0
        self.apply_sparse_grads(in_rows, in_grads * in_scale, out_rows, out_grads * out_scale, lr)
        return torch.stack([loss_sum, weight.sum()])

    @torch.no_grad()
    def window_rows(self, context_ids, weight, out_ids):
        """window_step's first phase as tensor ops: its gradient as Rows, one row a slot."""
        loss_sum, in_rows, in_grads, out_rows, out_grads = self.window_grads(context_ids, weight, out_ids)
        keys = torch.cat([in_rows, out_rows + self.vocab_size])
        uses = torch.cat([weight.reshape(-1), torch.ones_like(out_rows, dtype=in_grads.dtype)])
        packed = torch.cat([in_grads, out_grads])
        packed = torch.cat([packed, torch.div(keys, KEY_SPLIT, rounding_mode="floor").unsqueeze(1).to(packed.dtype),
                            torch.remainder(keys, KEY_SPLIT).unsqueeze(1).to(packed.dtype), uses.unsqueeze(1)], 1)
        return Rows(packed, torch.stack([loss_sum, weight.sum()]))

    @torch.no_grad()
    def apply_rows(self, rows, lr):
        """window_step's second phase as tensor ops: SGD from Rows, each row scaled by its uses over all of them."""
        packed = rows.packed if rows.segments is None else torch.cat([rows.packed[a:b] for a, b in rows.segments])
        dim, vocab = self.embed_size, self.vocab_size
        keys = packed[:, dim].long() * KEY_SPLIT + packed[:, dim + 1].long()
        grads = packed[:, :dim] * self.row_damping(keys, packed[:, dim + 2], 2 * vocab)
        is_in = (keys < vocab).unsqueeze(1)
        # in rows into in_embed, out rows into out_embed: the other table's rows add zeros (no host sync to split them)
        self.apply_sparse_grads(keys.clamp(max=vocab - 1), grads * is_in, (keys - vocab).clamp(min=0), grads * ~is_in,
                                lr)

    def row_damping(self, rows, weights, n_rows=None):
        """Per-entry factor min(1, MAX_SUMMED_GRADIENTS / k), k the weighted count of the entry's row in rows.

        A tally of n_rows (default V; 2V for keys over both tables) by index_add_: no host sync, so a
        CUDA graph can hold it.
        """
        size = n_rows or self.vocab_size
        tally = torch.zeros(size, device=rows.device, dtype=weights.dtype).index_add_(0, rows, weights)
        return (MAX_SUMMED_GRADIENTS / tally[rows]).clamp_(max=1.0).unsqueeze(1)

    @torch.no_grad()
    def apply_sparse_grads(self, in_rows, in_grads, out_rows, out_grads, lr):
        """Plain SGD on the touched rows only."""
        self.in_embed.weight.index_add_(0, in_rows, in_grads, alpha=-lr)
        self.out_embed.weight.index_add_(0, out_rows, out_grads, alpha=-lr)


def _sgns_loss(center, context, negatives):
    """Mean SGNS loss from the vectors: center B x d, context B x d, negatives B x K x d."""
    pos_score = (center * context).sum(-1)
    neg_score = torch.bmm(negatives, center.unsqueeze(2)).squeeze(2)
    return (-F.logsigmoid(pos_score) - F.logsigmoid(-neg_score).sum(-1)).mean()


# ---------------------------------------------------------------------------------------------
# RNN-SGNS: word vectors computed from the word's characters

PAD_CHAR, UNKNOWN_CHAR = 0, 1  # character ids reserved for padding and characters never seen
# The character n-grams a word's spelling is split into (fastText's, lengths 3 to 6, of the
# word between "<" and ">"): each n-gram of a vocabulary word has a trained row.
GRAM_LENGTHS = range(3, 7)
# At most this many n-gram rows (fastText's default bucket count): a vocabulary of millions of
# words has tens of millions of n-grams, most of them one word's, whose rows would outweigh the rest.
GRAM_ROWS_MAX = 2_000_000
# Words the rnn encoder spells at a time for the vectors users get: a bigger batch is a little
# faster and holds more memory at the end of a run, above training's.
SPELL_BATCH = 2048


def normalize_word(word):
    """The corpus's normalisation (lowercase, curly apostrophe -> '), so that queries match training."""
    return word.lower().replace("\u2019", "'")


class CharVocab:
    """Character ids for spelling words: 0 pads, 1 stands for any character not seen in training.

    Built from the vocabulary alone (sorted, so the same words always give the same ids): a
    checkpoint, which stores its words, rebuilds the same alphabet without storing it.
    """

    def __init__(self, words):
        letters = sorted({ch for word in words for ch in normalize_word(word) if ch.isalpha() or ch == "'"})
        self.chars = letters
        self.index = {ch: i + 2 for i, ch in enumerate(letters)}

    def __len__(self):
        return len(self.chars) + 2

    def encode(self, words):
        """(N x L int64 char ids, padded with 0; N lengths). The empty word is one unknown char,
        so that every word has a length >= 1 for the LSTM."""
        spelled = [[self.index.get(ch, UNKNOWN_CHAR) for ch in normalize_word(w)] or [UNKNOWN_CHAR] for w in words]
        lengths = torch.tensor([len(ids) for ids in spelled], dtype=torch.int64)
        char_ids = torch.zeros(len(spelled), int(lengths.max()) if len(spelled) else 1, dtype=torch.int64)
        for row, ids in enumerate(spelled):
            char_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return char_ids, lengths


def char_grams(word):
    """The character n-grams of a word (GRAM_LENGTHS, marked "<word>"), each once, in order of
    first appearance; the whole marked word is not one of them: the per-word vector stands for it."""
    marked = f"<{normalize_word(word)}>"
    longest = min(GRAM_LENGTHS.stop, len(marked))  # exclusive: shorter than the whole marked word
    return list(dict.fromkeys([marked[i:i + n] for n in range(GRAM_LENGTHS.start, longest)
                               for i in range(len(marked) - n + 1)]))


def grams_of_words(words):
    """(every word's n-grams, one flat array of str; the count of each word's) for any strings."""
    per_word = [char_grams(w) for w in words]
    counts = np.fromiter(map(len, per_word), dtype=np.int64, count=len(per_word))
    return np.array([g for grams in per_word for g in grams], dtype=f"<U{GRAM_LENGTHS.stop - 1}"), counts


def gram_vocabulary(flat_grams):
    """The n-grams that have a row, from the vocabulary's grams_of_words, sorted (so a checkpoint's
    word list rebuilds the same rows): every one, or past GRAM_ROWS_MAX those most words share."""
    grams, sharers = np.unique(flat_grams, return_counts=True)
    if len(grams) <= GRAM_ROWS_MAX:
        return grams
    most_shared = np.argsort(-sharers, kind="stable")[:GRAM_ROWS_MAX]
    return grams[np.sort(most_shared)]


def _firsts(counts):
    """Where each of consecutive runs of these lengths starts (an exclusive cumulative sum)."""
    return torch.cumsum(counts, 0) - counts


@contextlib.contextmanager
def without_onednn():
    """The encoder by torch's own CPU code: oneDNN keeps a primitive, and its memory, for every
    input shape it sees, and words come in new shapes (count, length) every batch."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled


class CharWordEncoder(nn.Module):
    """Characters -> embedding -> LSTM (or GRU) -> last hidden states (both directions) and the
    mean of the top layer's outputs over the word -> linear -> d.

    The mean over positions keeps the middle of a word, where the stem is, which the last states
    (the end read forwards, the start read backwards) hold least of.
    """

    def __init__(self, n_chars, embed_size, char_embed_size=32, hidden_size=128, num_layers=1, dropout=0.0,
                 bidirectional=False, mlp_size=None, cell="lstm"):
        super().__init__()
        self.directions = 2 if bidirectional else 1
        self.char_embed = nn.Embedding(n_chars, char_embed_size, padding_idx=PAD_CHAR)
        # the recurrent layer's own dropout acts between layers only (it warns when there is one layer)
        recurrent = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = recurrent(char_embed_size, hidden_size, num_layers=num_layers, batch_first=True,
                             dropout=dropout if num_layers > 1 else 0.0, bidirectional=bidirectional)
        self.dropout = nn.Dropout(dropout)
        features = 2 * hidden_size * self.directions  # the last states and the mean outputs
        mlp_size = mlp_size or embed_size
        if mlp_size == embed_size:
            self.head = nn.Linear(features, embed_size)
        else:  # a hidden layer of another width needs a non-linearity to be more than one linear map
            self.head = nn.Sequential(nn.Linear(features, mlp_size), nn.Tanh(), nn.Linear(mlp_size, embed_size))

    def forward(self, char_ids, lengths, packed=None):
        """char_ids N x L (padded), lengths N (>= 1) -> N x d.

        Either way padding never enters a word's vector: each word's recurrence stops at its own
        last character (and, backwards, starts there). `packed` (default: on CUDA only) runs
        one packed-sequence call, which cuDNN does well; on the CPU, one plain call per
        word length is faster, mostly in the backward pass.
        """
        if packed is None:
            packed = char_ids.is_cuda
        features = (self._features_packed if packed else self._features_by_length)(char_ids, lengths)
        return self.head(self.dropout(features))

    def _top_states(self, h_n):
        """h_n (layers*directions) x N x H -> N x (directions*H): the top layer, directions side by side."""
        if isinstance(h_n, tuple):  # an LSTM's (h_n, c_n)
            h_n = h_n[0]
        return h_n[-self.directions:].transpose(0, 1).reshape(h_n.shape[1], -1)

    def _features_packed(self, char_ids, lengths):
        lengths = lengths.cpu()  # pack_padded_sequence wants them on the CPU
        char_ids = char_ids[:, :int(lengths.max())]  # no step over columns that are padding for all
        packed = pack_padded_sequence(self.char_embed(char_ids), lengths, batch_first=True, enforce_sorted=False)
        outputs, h_n = self.rnn(packed)  # both come back in the input's order
        padded, _ = pad_packed_sequence(outputs, batch_first=True)  # zeros past each word's end
        mean = padded.sum(1) / lengths.to(padded.device, padded.dtype).unsqueeze(1)
        return torch.cat([self._top_states(h_n), mean], 1)

    def _features_by_length(self, char_ids, lengths):
        order = torch.argsort(lengths, stable=True)
        word_lengths, counts = torch.unique_consecutive(lengths[order], return_counts=True)
        parts, start = [], 0
        for length, count in zip(word_lengths.tolist(), counts.tolist()):
            rows = order[start:start + count]
            start += count
            outputs, h_n = self.rnn(self.char_embed(char_ids[rows, :length]))
            parts.append(torch.cat([self._top_states(h_n), outputs.mean(1)], 1))
        return torch.cat(parts)[torch.argsort(order)]  # back from length order to the input's order


class RNNSGNS(nn.Module):
    """SGNS where a word's input vector is composed from its spelling.

    A word's vector is a per-word vector (word_embed, words of the vocabulary) plus its
    spelling part: the encoding of its characters by a recurrent encoder, plus the mean of the
    rows of its character n-grams (gram_embed, as fastText's). A word never seen in training
    gets the spelling part alone, from the n-grams it shares with the vocabulary. Contexts and
    negatives come from a plain output table (out_embed). The encoder and the n-gram rows are
    shared by words, so what frequent words teach them (endings, stems) carries to rare and
    unseen ones.
    """

    def __init__(self, words, embed_size, char_embed_size=32, hidden_size=128, num_layers=1, dropout=0.0,
                 bidirectional=False, mlp_size=None, cell="lstm"):
        super().__init__()
        self.vocab_size, self.embed_size = len(words), embed_size
        self.char_vocab = CharVocab(words)
        self.word_index = {normalize_word(w): i for i, w in enumerate(words)}
        # dense gradients where autograd trains the tables (DataParallel and DDP reduce no sparse ones)
        self.word_embed = nn.Embedding(len(words), embed_size)
        self.out_embed = nn.Embedding(len(words), embed_size)
        flat_grams, gram_counts = grams_of_words(words)
        self.grams = gram_vocabulary(flat_grams)  # sorted: row i is grams[i]
        self.gram_embed = nn.Embedding(len(self.grams), embed_size)
        self.encoder = CharWordEncoder(len(self.char_vocab), embed_size, char_embed_size=char_embed_size,
                                       hidden_size=hidden_size, num_layers=num_layers, dropout=dropout,
                                       bidirectional=bidirectional, mlp_size=mlp_size, cell=cell)
        with torch.no_grad():  # word2vec's start: inputs small and random, outputs zero
            self.word_embed.weight.uniform_(-0.5 / embed_size, 0.5 / embed_size)
            self.gram_embed.weight.uniform_(-0.5 / embed_size, 0.5 / embed_size)
            self.out_embed.weight.zero_()
        char_ids, lengths = self.char_vocab.encode(words)
        # The spelling of every word id, and its n-grams' rows. Not saved (persistent=False): the
        # checkpoint's word list rebuilds them, and they would double the checkpoint's size.
        self.register_buffer("word_chars", char_ids, persistent=False)
        self.register_buffer("word_lengths", lengths, persistent=False)
        gram_ids, gram_counts = self._gram_rows(flat_grams, gram_counts)
        self.register_buffer("word_gram_ids", gram_ids, persistent=False)
        self.register_buffer("word_gram_counts", gram_counts, persistent=False)
        self.register_buffer("word_gram_starts", _firsts(gram_counts), persistent=False)

    def _gram_rows(self, flat, counts):
        """grams_of_words's (flat n-grams, count of each word's) -> the same as rows of gram_embed;
        n-grams without a row are left out."""
        rows = np.searchsorted(self.grams, flat)
        has_row = rows < len(self.grams)
        has_row[has_row] = self.grams[rows[has_row]] == flat[has_row]
        word_of = np.repeat(np.arange(len(counts)), counts)
        kept_counts = np.bincount(word_of[has_row], minlength=len(counts)).astype(np.int64)
        return torch.from_numpy(rows[has_row].astype(np.int64)), torch.from_numpy(kept_counts)

    def grams_of(self, ids):
        """The n-gram rows of word ids (N): (flat rows, N counts), as embedding_bag takes them."""
        counts = self.word_gram_counts[ids]
        positions = torch.arange(int(counts.sum()), device=ids.device) + torch.repeat_interleave(
            self.word_gram_starts[ids] - _firsts(counts), counts)
        return self.word_gram_ids[positions], counts

    def gram_mean(self, gram_ids, counts):
        """Each word's mean n-gram row (zeros for a word with none) -> N x d."""
        return F.embedding_bag(gram_ids, self.gram_embed.weight, _firsts(counts), mode="mean")

    def encode(self, ids):
        """The encoder's part of distinct word ids (N) -> N x d, with gradients."""
        return self.encoder(self.word_chars[ids], self.word_lengths[ids])

    def spell(self, ids):
        """The spelling part of distinct word ids (N): the encoder's plus the mean n-gram row -> N x d."""
        return self.encode(ids) + self.gram_mean(*self.grams_of(ids))

    def input_vectors(self, ids):
        """Input vectors of word ids of any shape -> ids.shape + (d,): each distinct word encoded once."""
        distinct, where = torch.unique(ids.reshape(-1), return_inverse=True)
        vectors = self.word_embed(distinct) + self.spell(distinct)
        return vectors[where].reshape(*ids.shape, self.embed_size)

    def forward(self, center_ids, context_ids, neg_ids):
        """Mean SGNS loss over the pairs, as SGNS.forward."""
        return _sgns_loss(self.input_vectors(center_ids), self.out_embed(context_ids), self.out_embed(neg_ids))

    @torch.no_grad()
    def _spell_all(self, char_ids, lengths, batch_size):
        was_training = self.training
        self.eval()  # no dropout: the vectors users see are deterministic
        try:
            with without_onednn():
                parts = [self.encoder(char_ids[i:i + batch_size], lengths[i:i + batch_size])
                         for i in range(0, len(lengths), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(parts) if parts else char_ids.new_zeros((0, self.embed_size), dtype=torch.float32)

    def embeddings(self, batch_size=SPELL_BATCH):
        """The V x d input vectors of the vocabulary (per-word part plus spelling), without gradients."""
        with torch.no_grad():
            grams = self.gram_mean(self.word_gram_ids, self.word_gram_counts)
        return self.word_embed.weight.detach() + grams + self._spell_all(self.word_chars, self.word_lengths, batch_size)

    def embed_words(self, words, batch_size=SPELL_BATCH):
        """Input vectors (len(words) x d) for any strings: a word of the vocabulary gets the vector
        embeddings() gives it, any other the encoding of its spelling alone."""
        words = list(words)
        char_ids, lengths = self.char_vocab.encode(words)
        vectors = self._spell_all(char_ids.to(self.word_chars.device), lengths, batch_size)
        with torch.no_grad():
            vectors += self.gram_mean(*(t.to(vectors.device) for t in self._gram_rows(*grams_of_words(words))))
        known = [(row, self.word_index[normalize_word(w)]) for row, w in enumerate(words)
                 if normalize_word(w) in self.word_index]
        if known:
            rows, ids = (torch.tensor(x, device=vectors.device) for x in zip(*known))
            vectors[rows] += self.word_embed.weight.detach()[ids]
        return vectors


def build_model(model_name, vocab_size, embed_size, sparse=True, words=None, args=None, **kwargs):
    """The model a run asks for, by name.

    The RNN model needs the vocabulary (`words`, id order) to spell its words, and reads its
    sizes from `args` (the run's flags as a dict; missing ones take the CLI defaults).
    """
    if model_name == "sgns":
        return SGNS(vocab_size, embed_size, sparse=sparse)
    if model_name == "rnn":
        if words is None or len(words) != vocab_size:
            raise ValueError("the rnn model needs the vocabulary's words (one per id)")
        return RNNSGNS(words, embed_size, **_rnn_sizes(args))
    raise ValueError(f"unknown model name {model_name!r}")


def _rnn_sizes(args):
    """RNNSGNS's keyword arguments from the run's flags (a dict; missing ones take the CLI defaults)."""
    args = {**RNN_DEFAULTS, **{k: v for k, v in (args or {}).items() if v is not None}}
    return dict(char_embed_size=args["char_embed_size"], hidden_size=args["hidden_size"],
                num_layers=args["num_layer"], dropout=args["dropout"], bidirectional=bool(args["bidirectional"]),
                mlp_size=args["mlp_size"], cell=args["rnn_cell"])


def rnn_parameter_count(words, embed_size, args=None):
    """How many parameters build_model would make for the rnn model of this vocabulary, counted
    without allocating them (tables.parameter_count counts either model's)."""
    with torch.device("meta"):  # the encoder's shapes only
        encoder = CharWordEncoder(len(CharVocab(words)), embed_size, **_rnn_sizes(args))
    n_grams = len(gram_vocabulary(grams_of_words(words)[0]))
    return (2 * len(words) + n_grams) * embed_size + sum(p.numel() for p in encoder.parameters())


def model_from_checkpoint(ckpt):
    """Rebuild the trained model held by a checkpoint dict (loaded with weights_only=True)."""
    args = ckpt["args"]
    model = build_model(ckpt["model_name"], len(ckpt["words"]), args["embed_size"], words=ckpt["words"], args=args)
    model.load_state_dict(ckpt["model"])
    return model.eval()
