"""RNN-SGNS bench: unique-word vs per-occurrence encoding speed, and vectors for unseen inflected forms.

    NLTK_DATA=../shared/nltk_data python bench/bench_rnn.py [--dataset ../shared/corpora/gutenberg] [--threads 1] ...

1. Speed. The same batches of the first epoch (trainer's subsampling, window and negatives)
   are trained with Adam twice from the same weights: once encoding each distinct word of a
   batch once (RNNSGNS.unique=True, the default), once encoding every position (the original sgns_pytorch's
   method). A per-occurrence epoch takes hours on a CPU, so a few batches of each are timed
   and both are extrapolated to the epoch's batch count.
2. Unseen words. The ten most frequent plurals whose singular is also in the vocabulary are
   removed from the corpus (tokens and vocabulary): the first five are the test forms, the
   next five the validation forms. The model trains on the rest as the trainer trains it
   (sentence blocks shuffled each epoch, Adam with its learning rate decayed linearly); each
   plural is then embedded from its characters (embed_words, center vectors) and its 10
   nearest vocabulary words by cosine are printed, with whether the singular is among them.
   Cosine on the raw vectors, and after all-but-the-top post-processing (evaluate.py
   --remove-top N: mean and N top principal directions removed). N is chosen on the
   validation forms alone; the test forms give the result.
"""
import argparse
import sys
import time

import numpy as np
import torch

from paths import GUTENBERG, ROOT
import data  # noqa: E402
import evaluate  # noqa: E402
import engines  # noqa: E402
from model import RNN_DEFAULTS, RNNSGNS  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default=str(GUTENBERG),
                   help="corpus folder or file")
    p.add_argument("--cache-dir", default=str(ROOT / "data" / "cache"), help="corpus cache folder")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (on a CPU shared with other jobs, more threads than free cores is slower)")
    p.add_argument("--embed-size", type=int, default=100, help="embedding dimension d")
    p.add_argument("--batch-size", type=int, default=65536, help="pairs per batch for the speed comparison")
    p.add_argument("--unique-batches", type=int, default=3, help="batches timed with unique-word encoding")
    p.add_argument("--occurrence-batches", type=int, default=1, help="batches timed with per-occurrence encoding")
    p.add_argument("--train-batch-size", type=int, default=4096, help="pairs per batch for the unseen-word run")
    p.add_argument("--train-epochs", type=float, default=1.0, help="epochs of the unseen-word run (1: ~17 min on 1 CPU thread)")
    p.add_argument("--train-lr", type=float, default=3e-3,
                   help="first Adam learning rate of the unseen-word run, decayed linearly to 0 "
                        "(3e-3 beat 1e-2 on the GPU: 2 of 5 against 0)")
    p.add_argument("--train-bidirectional", action=argparse.BooleanOptionalAction, default=True,
                   help="bidirectional LSTM for the unseen-word run: a forward LSTM's last state is dominated by "
                        "the word's ending ('hands' starts next to 'lands'), the backward one by its beginning")
    p.add_argument("--train-hidden-size", type=int, default=64,
                   help="LSTM hidden size of the unseen-word run")
    p.add_argument("--max-remove-top", type=int, default=8,
                   help="largest number of top directions (evaluate.py --remove-top) the validation forms choose from")
    p.add_argument("--parts", default="both", choices=["both", "speed", "unseen"], help="which measurements to run")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    return p.parse_args()


WINDOW, NEGATIVES, SUBSAMPLE = 5, 5, 1e-3  # the trainer's defaults


def epoch_batches(token_ids, sentence_starts, counts, batch_size, seed, device, epoch=0):
    """One epoch as the trainer draws it: subsampled stream, pair batches and negatives (a generator)."""
    rng = data.epoch_rng(seed, epoch)
    kept, starts = data.subsample(token_ids, sentence_starts, data.keep_probabilities(counts, SUBSAMPLE), rng)
    kept, starts = data.shuffle_sentence_blocks(kept, starts, seed, epoch)
    sampler = data.NegativeSampler(counts)
    n_batches = -(-len(kept) // max(1, batch_size // (WINDOW + 1)))

    def batches():
        per_batch = max(1, batch_size // (WINDOW + 1))  # centers: a center has WINDOW + 1 pairs on average
        for lo in range(0, len(kept), per_batch):
            center, context = data.window_pairs(kept, starts, lo, min(lo + per_batch, len(kept)), WINDOW, rng)
            negs = sampler.sample((len(center), NEGATIVES), rng)
            yield tuple(torch.from_numpy(a).to(device) for a in (center, context, negs))
    return n_batches, batches()


def train_step(model, optimizer, batch):
    optimizer.zero_grad(set_to_none=True)
    loss = model(*batch)
    loss.backward()
    optimizer.step()
    return loss.item()  # also waits for a GPU to finish the step, so timings are real


def time_steps(model, initial_state, batches, unique):
    """Seconds per step over `batches`, from the same starting weights and optimizer state."""
    model.load_state_dict(initial_state)
    model.unique = unique
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    for batch in batches:
        train_step(model, optimizer, batch)
    return (time.perf_counter() - start) / len(batches)


def speed(corpus, args):
    print(f"== speed: batch size {args.batch_size} pairs, {args.threads} thread(s), default model "
          f"{ {**RNN_DEFAULTS, 'embed_size': args.embed_size} }")
    torch.manual_seed(args.seed)
    model = RNNSGNS(corpus.words, args.embed_size).to(args.device)
    initial_state = {k: v.clone() for k, v in model.state_dict().items()}
    n_batches, stream = epoch_batches(corpus.token_ids, corpus.sentence_starts, corpus.counts, args.batch_size,
                                      args.seed, args.device)
    wanted = max(args.unique_batches, args.occurrence_batches) + 1
    batches = [next(stream) for _ in range(wanted)]
    positions = [b[0].numel() + b[1].numel() + b[2].numel() for b in batches]
    distinct = [b[0].unique().numel() + torch.cat([b[1], b[2].reshape(-1)]).unique().numel() for b in batches]
    print(f"epoch: {n_batches} batches; a batch names {np.mean(positions):,.0f} words (center, context, "
          f"negative positions), {np.mean(distinct):,.0f} distinct (center and context encoders counted apart)")
    time_steps(model, initial_state, batches[:1], unique=True)  # warm-up (allocator, kernels); not timed
    unique_step = time_steps(model, initial_state, batches[1:1 + args.unique_batches], unique=True)
    occurrence_step = time_steps(model, initial_state, batches[1:1 + args.occurrence_batches], unique=False)
    print(f"unique-word encoding:    {unique_step:8.3f} s/batch (mean of {args.unique_batches}) "
          f"-> epoch ~{unique_step * n_batches / 60:7.1f} min (extrapolated)")
    print(f"per-occurrence encoding: {occurrence_step:8.3f} s/batch (mean of {args.occurrence_batches}) "
          f"-> epoch ~{occurrence_step * n_batches / 60:7.1f} min (extrapolated)")
    print(f"speed-up: {occurrence_step / unique_step:.1f}x (target >= 10x)")


# ---------------------------------------------------------------------------------------------

def plural_pairs(words, counts, n=5):
    """The n most frequent plurals (word + 's', not -ss/-us/-is, not a function word such as
    'does') whose singular is frequent too."""
    from nltk.corpus import stopwords
    try:
        function_words = set(stopwords.words("english"))
    except LookupError:
        sys.exit("bench_rnn.py needs NLTK's stopwords: set NLTK_DATA=../shared/nltk_data (or nltk.download('stopwords'))")
    index = {w: i for i, w in enumerate(words)}
    pairs = []
    for i, word in enumerate(words):  # by descending count
        singular = word[:-1]
        if (len(word) >= 4 and word.endswith("s") and not word.endswith(("ss", "us", "is", "'s"))
                and word not in function_words and singular in index and counts[index[singular]] >= 100):
            pairs.append((word, singular))
        if len(pairs) == n:
            return pairs
    return pairs


def without_words(corpus, removed):
    """(words, counts, token_ids, sentence_starts) of the corpus with every token of `removed` deleted."""
    drop = np.zeros(len(corpus.words), dtype=bool)
    drop[[corpus.words.index(w) for w in removed]] = True
    new_id = np.cumsum(~drop) - 1
    keep_token = ~drop[corpus.token_ids]
    kept_before = np.concatenate([[0], np.cumsum(keep_token)])
    token_ids = new_id[corpus.token_ids[keep_token]].astype(np.uint32)
    starts = np.unique(kept_before[corpus.sentence_starts])  # a sentence left empty merges with the next
    starts = starts[starts < len(token_ids)]
    words = [w for w, d in zip(corpus.words, drop) if not d]
    return words, corpus.counts[~drop], token_ids, starts.astype(np.int64)


def stem_ranks(model, words, pairs, remove_top):
    """For each (plural, singular): the singular's rank among the plural's nearest vocabulary
    words by cosine, and the 10 nearest as (word, cosine).

    remove_top: None for the raw center vectors; else they first lose their mean and their
    remove_top top principal directions (evaluate.all_but_the_top; 0 only centres).
    """
    table, queries = model.embeddings().cpu().numpy(), model.embed_words([p for p, _ in pairs]).cpu().numpy()
    if remove_top is not None:
        transform = evaluate.all_but_the_top(table, remove_top)
        table, queries = transform(table), transform(queries)
    table, queries = evaluate.normalize_rows(table), evaluate.normalize_rows(queries)
    result = []
    for (plural, singular), query in zip(pairs, queries):
        scores = table @ query
        top = np.argsort(-scores, kind="stable")[:10]
        result.append((int((scores > scores[words.index(singular)]).sum()) + 1,
                       [(words[i], float(scores[i])) for i in top]))
    return result


def print_neighbours(pairs, ranks, title):
    print(f"-- {title}")
    for (plural, singular), (rank, top) in zip(pairs, ranks):
        print(f"{plural:>10} ({'stem found' if rank <= 10 else 'stem missing'}, '{singular}' ranks {rank}): "
              + ", ".join(f"{w} {c:.2f}" for w, c in top))
    print(f"   stem among the 10 nearest: {sum(rank <= 10 for rank, _ in ranks)} of {len(pairs)}")


def unseen_words(corpus, args):
    """Train without 10 plurals: 5 to test, 5 to choose how many top directions to remove."""
    both = plural_pairs(corpus.words, corpus.counts, n=10)
    test, validation = both[:5], both[5:]
    words, counts, token_ids, starts = without_words(corpus, [plural for plural, _ in both])
    print(f"\n== unseen inflected forms: removed {', '.join(p for p, _ in test)} (test) and "
          f"{', '.join(p for p, _ in validation)} (validation), {len(corpus) - len(token_ids):,} tokens; "
          f"vocabulary {len(words):,} words")
    torch.manual_seed(args.seed)
    model = RNNSGNS(words, args.embed_size, bidirectional=args.train_bidirectional,
                    hidden_size=args.train_hidden_size).to(args.device)
    print(f"model: {'bidirectional' if args.train_bidirectional else 'forward'} LSTM, hidden size "
          f"{args.train_hidden_size}, other sizes default")
    assert not set(p for p, _ in both) & set(words)
    print_neighbours(test, stem_ranks(model.eval(), words, test, None), "untrained model (spelling alone), raw vectors")
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.train_lr)
    schedule = argparse.Namespace(lr=args.train_lr)
    start, steps, losses, epoch = time.perf_counter(), 0, [], 0
    n_batches, _ = epoch_batches(token_ids, starts, counts, args.train_batch_size, args.seed, args.device)
    total_steps = max(1, round(args.train_epochs * n_batches))
    while steps < total_steps:
        _, stream = epoch_batches(token_ids, starts, counts, args.train_batch_size, args.seed, args.device, epoch)
        for batch in stream:
            for group in optimizer.param_groups:
                group["lr"] = engines.lr_at(schedule, steps / total_steps)
            losses.append(train_step(model, optimizer, batch))
            steps += 1
            if steps == total_steps:
                break
        epoch += 1
    elapsed = time.perf_counter() - start
    print(f"trained {steps} steps of {args.train_batch_size} pairs ({steps / n_batches:.2f} epochs, sentence "
          f"blocks shuffled each epoch) in {elapsed:.0f} s, Adam lr {args.train_lr} decayed linearly: loss "
          f"{np.mean(losses[:3]):.3f} (first 3 steps) -> {np.mean(losses[-3:]):.3f} (last 3)")
    model.eval()
    choices = [None] + list(range(args.max_remove_top + 1))
    ranks = {d: (stem_ranks(model, words, validation, d), stem_ranks(model, words, test, d)) for d in choices}
    hits = {d: tuple(sum(r <= 10 for r, _ in part) for part in ranks[d]) for d in choices}
    print("\ntop directions removed | validation hits | test hits | test ranks")
    for d in choices:
        print(f"{'raw' if d is None else d:>22} | {hits[d][0]:>15} | {hits[d][1]:>9} | "
              f"{[r for r, _ in ranks[d][1]]}")
    chosen = max(choices, key=lambda d: (hits[d][0], -1 if d is None else -d))  # ties: fewest directions
    print_neighbours(test, ranks[None][1], "trained model, raw vectors")
    name = "raw vectors" if chosen is None else f"{chosen} top directions removed"
    print_neighbours(validation, ranks[chosen][0], f"trained model, {name} (validation)")
    print_neighbours(test, ranks[chosen][1], f"trained model, {name} (test)")
    print(f"result: {hits[chosen][1]} of {len(test)} removed test forms have their stem among their 10 nearest "
          f"with {name}, chosen on the validation forms (raw vectors: {hits[None][1]}; target >= 3 of 5)")


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    corpus = data.load_corpus(args.dataset, cache_dir=args.cache_dir, min_count=5)
    print(f"corpus {corpus.name}: {len(corpus):,} tokens, {len(corpus.words):,} words; torch {torch.__version__}, "
          f"{args.threads} thread(s)")
    if args.parts in ("both", "unseen"):
        unseen_words(corpus, args)
    if args.parts in ("both", "speed"):
        speed(corpus, args)


if __name__ == "__main__":
    main()
