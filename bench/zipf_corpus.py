"""A synthetic corpus at Wikipedia-sized vocabularies: Zipf-distributed pseudo-words in sentences of realistic lengths.

    python bench/zipf_corpus.py /tmp/zipf-1m.txt        # 60M words, 1.0M distinct (the defaults); 6 min, 193 MB
    python trainer.py --dataset /tmp/zipf-1m.txt --remove-th 1 ...     # the trainer reads it as text (3 min to tokenise once)

Word ids are drawn independently from a truncated Zipf law, p(rank r) proportional to
r^-exponent for r = 1..vocab, and each id is written as a pseudo-word of lowercase letters
(bijective base 26: a, b, ..., z, aa, ab, ...; the most frequent ids get the shortest words), so
the trainer's own tokeniser builds the vocabulary and its cache from plain text. Sentences end
with "." and hold a log-normal number of words (median --sentence-median, log standard deviation
--sentence-sigma, at least 1).

The default exponent, 1.1, is the slope of log count against log rank over ranks 10-1,000 of the
shared Gutenberg corpus (1.11; Zipf's classic value is 1.0), and with it the 10,000 most frequent
of 1M words cover 82% of the tokens, as in large English corpora. Real vocabularies fall faster
past a few ten thousand ranks; a single exponent over 1M ranks gives more rare words, which is
the hard case for an exchange that sends touched rows. Sentence lengths default to a median of
20 words (log sd 0.6, mean about 24), those of encyclopaedic prose; the Gutenberg books have a
median of 11. Words are drawn independently: real text repeats topical words within a passage,
so an interval of it touches fewer distinct rows than this text does.

Speed and bytes can be measured on it; word-vector quality cannot (there is nothing to learn).
"""
import argparse
import os
import sys

import numpy as np

ALPHABET = np.array(list("abcdefghijklmnopqrstuvwxyz"))


def pseudo_words(n):
    """The n shortest lowercase words in order (bijective base 26: a..z, aa..zz, aaa...), as a numpy string array."""
    words, length, remaining = [], 1, n
    while remaining > 0:
        count = min(remaining, 26 ** length)
        digits = (np.arange(count)[:, None] // 26 ** np.arange(length - 1, -1, -1)) % 26
        words.append(np.array(["".join(row) for row in ALPHABET[digits]]))
        remaining -= count
        length += 1
    return np.concatenate(words)


def zipf_cdf(vocab, exponent):
    """Cumulative probabilities of ranks 1..vocab under p(r) proportional to r^-exponent."""
    weights = np.arange(1, vocab + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


def expected_vocabulary(vocab, exponent, tokens, min_count):
    """Expected number of ranks drawn at least min_count times in `tokens` draws (Poisson approximation)."""
    from scipy.stats import poisson
    weights = np.arange(1, vocab + 1, dtype=np.float64) ** -exponent
    means = tokens * weights / weights.sum()
    return float(poisson.sf(min_count - 1, means).sum())


def sentence_lengths(rng, n, median, sigma):
    return np.maximum(1, np.rint(rng.lognormal(np.log(median), sigma, n))).astype(np.int64)


def write_corpus(path, vocab, tokens, exponent, median, sigma, seed, chunk=2_000_000):
    """Write `tokens` words in sentences to path (atomically: a temporary file renamed into place)."""
    rng = np.random.default_rng(seed)
    cdf = zipf_cdf(vocab, exponent)
    spelled = np.append(pseudo_words(vocab), ".\n")  # the last entry ends a sentence
    end_id = vocab
    tmp = f"{path}.tmp{os.getpid()}"
    written = 0
    with open(tmp, "w", encoding="ascii") as out:
        while written < tokens:
            n = min(chunk, tokens - written)
            ids = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), vocab - 1)
            lengths = sentence_lengths(rng, n // 8 + 1, median, sigma)
            ends = np.cumsum(lengths)
            ends = ends[ends < n]
            stream = np.insert(ids, ends, end_id)  # a sentence end after each sentence's last word
            out.write(" ".join(spelled[stream]))
            out.write(" .\n")
            written += n
    os.replace(tmp, path)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="text file to write")
    p.add_argument("--vocab", type=int, default=1_050_000,
                   help="word ids drawn from, at most 2,000,000 (the default gives 1.0M distinct words in 60M)")
    p.add_argument("--tokens", type=int, default=60_000_000, help="words in the corpus")
    p.add_argument("--exponent", type=float, default=1.1, help="Zipf exponent (see above for the default)")
    p.add_argument("--sentence-median", type=float, default=20.0, help="median sentence length in words")
    p.add_argument("--sentence-sigma", type=float, default=0.6, help="log standard deviation of sentence lengths")
    p.add_argument("--seed", type=int, default=1, help="random seed")
    args = p.parse_args()
    if not 1 <= args.vocab <= 2_000_000 or args.tokens < 1 or args.exponent <= 0:
        p.error("--vocab must be in 1..2,000,000, --tokens and --exponent positive")
    for min_count in (1, 5):
        print(f"expected vocabulary at --remove-th {min_count}: "
              f"{expected_vocabulary(args.vocab, args.exponent, args.tokens, min_count):,.0f} words", flush=True)
    write_corpus(args.out, args.vocab, args.tokens, args.exponent, args.sentence_median, args.sentence_sigma,
                 args.seed)
    print(f"wrote {args.out}: {args.tokens:,} words, {os.path.getsize(args.out) / 1e6:,.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
