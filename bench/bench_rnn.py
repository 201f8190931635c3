"""RNN-SGNS against fastText's subword skip-gram and our sgns, side by side on one corpus.

    NLTK_DATA=../shared/nltk_data python bench/bench_rnn.py [--dataset ../shared/corpora/gutenberg] [--threads 2]

Each tool trains d=100, 5 epochs, window 5, 5 negatives, sample 1e-3, min count 5 on the same
tokens (our corpus cache, written out one sentence a line for fastText; the cache is built
before the clocks start), as its own process: whole process wall time and peak RSS. Ours run
with the trainer's defaults otherwise, PIP loss off (fastText does no monitoring). Quality:
WordSim353, SimLex-999, MEN (Spearman rho, pairs in the vocabulary), Google analogy accuracy
(3CosAdd, 30,000 most frequent words), Rare Words over the pairs in the vocabulary and over all
pairs (words the vocabulary lacks spelled by the model: our rnn's embed_words, fastText's
print-word-vectors; sgns cannot). Then the nearest neighbours of five words not in the
vocabulary, for our rnn and for fastText. fastText runs at its best: the peers' build
(-O3 -march=native), ../shared/peers/README.md's settings with 3-6 character n-grams.
"""
import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from paths import EVAL, GUTENBERG, ROOT
import data  # noqa: E402
import evaluate  # noqa: E402
from bench_peers import write_corpus_text  # noqa: E402
from bench_speed import quality, run_child  # noqa: E402

# Words to show neighbours of: the first five the vocabulary lacks (inflections, compounds).
UNSEEN_CANDIDATES = ("unkindly", "moonlit", "reawakened", "cheerfulness", "overpowering", "horseback",
                     "unhappily", "hopelessness", "carelessness", "footsteps", "bewilderment", "kindliness",
                     "unhappiest", "overpoweringly", "misremembered", "bewilderingly", "cheerlessness",
                     "kindheartedness", "unforgivingly", "dreamlessly")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default=str(GUTENBERG),
                   help="corpus folder or file")
    p.add_argument("--cache-dir", default=str(ROOT / "data" / "cache"), help="corpus cache folder")
    p.add_argument("--threads", type=int, default=2, help="threads of every tool")
    p.add_argument("--epochs", type=int, default=5, help="passes over the corpus")
    p.add_argument("--peers-dir", default="/tmp/sgns-peers", help="where ../shared/peers/build.sh put fasttext")
    p.add_argument("--tools", nargs="+", default=["fasttext", "rnn", "sgns"], choices=["fasttext", "rnn", "sgns"],
                   help="what to run")
    p.add_argument("--rnn-flags", default="", help="extra trainer flags for our rnn, e.g. '--word-share 0.5'")
    return p.parse_args()


def fasttext_embedder(fasttext, model_bin):
    """print-word-vectors of a trained fastText model, as evaluate's embed_fn."""
    def embed(words):
        out = subprocess.run([fasttext, "print-word-vectors", str(model_bin)], input="\n".join(words) + "\n",
                             capture_output=True, text=True, check=True).stdout.splitlines()
        return np.array([[float(x) for x in line.split()[1:]] for line in out], dtype=np.float32)
    return embed


def train(tool, args, corpus_txt, tmp):
    """Train one tool; returns (row of figures, vocabulary, vectors, embed_fn or None)."""
    if tool == "fasttext":
        fasttext = str(Path(args.peers_dir) / "fasttext")
        wall, rss, _ = run_child([fasttext, "skipgram", "-input", str(corpus_txt), "-output", str(tmp / "ft"),
                                  "-dim", "100", "-ws", "5", "-neg", "5", "-t", "1e-3", "-thread", str(args.threads),
                                  "-epoch", str(args.epochs), "-minCount", "5", "-minn", "3", "-maxn", "6",
                                  "-lr", "0.025", "-verbose", "0"])
        words, vectors = evaluate.load_vectors(tmp / "ft.vec")
        return {"wall": wall, "rss": rss}, words, vectors, fasttext_embedder(fasttext, tmp / "ft.bin")
    out = tmp / f"{tool}.txt"
    extra = ["--model-name", "rnn", *args.rnn_flags.split()] if tool == "rnn" else []
    wall, rss, _ = run_child([sys.executable, str(ROOT / "trainer.py"), "--dataset", args.dataset, "--cache-dir",
                              args.cache_dir, "--embed-size", "100", "--epochs", str(args.epochs), "--num-threads",
                              str(args.threads), "--pip-interval", "0", "--quiet", "--log-dir", str(tmp / "runs"),
                              "--run-name", tool, "--export", str(out), *extra])
    words, vectors = evaluate.load_vectors(out)
    embed_fn = evaluate.load_checkpoint(tmp / "runs" / tool)[2] if tool == "rnn" else None
    return {"wall": wall, "rss": rss}, words, vectors, embed_fn


def scores(words, vectors, embed_fn):
    row = quality(words, vectors)
    row["RW all"] = float("nan")
    rare = evaluate.load_pairs(EVAL / "rw_stanford.tsv")
    if embed_fn is not None:
        every = evaluate.similarity(words, vectors, rare, embed_fn=embed_fn)
        row["RW all"] = every["spearman"] if every["pairs"] == len(rare) else float("nan")
    row["RW pairs"] = evaluate.similarity(words, vectors, rare)["pairs"]
    row["mean3"] = (row["WS353"] + row["SimLex"] + row["MEN"]) / 3
    return row


def print_table(rows, n_rare):
    print(f"\n{'tool':10}{'wall s':>8}{'RSS MiB':>9}{'WS353':>7}{'SimLex':>7}{'MEN':>7}{'mean3':>7}{'analogy':>9}"
          f"{'RW in-vocab':>18}{'RW all ' + str(n_rare):>13}")
    for tool, r in rows.items():
        print(f"{tool:10}{r['wall']:8.1f}{r['rss']:9.0f}{r['WS353']:7.3f}{r['SimLex']:7.3f}{r['MEN']:7.3f}"
              f"{r['mean3']:7.3f}{100 * r['analogy']:8.1f}%{r['RW']:8.3f} ({r['RW pairs']:4} pairs){r['RW all']:13.3f}")
    if {"rnn", "fasttext"} <= rows.keys():
        rnn, ft = rows["rnn"], rows["fasttext"]
        print(f"\nrnn / fastText: speed {ft['wall'] / rnn['wall']:.2f}x (>= 1 wanted), analogy "
              f"{rnn['analogy'] - ft['analogy']:+.3f}, RW all {rnn['RW all'] - ft['RW all']:+.3f} (>= 0 wanted)")
    if {"rnn", "sgns"} <= rows.keys():
        rnn, sgns = rows["rnn"], rows["sgns"]
        print(f"rnn - sgns: mean rho {rnn['mean3'] - sgns['mean3']:+.3f} (>= -0.01 wanted), peak memory "
              f"{rnn['rss'] / sgns['rss']:.2f}x (<= 2 wanted)")


def print_neighbours(spelled, words):
    unseen = [w for w in UNSEEN_CANDIDATES if w not in set(words)][:5]
    for tool, (vocab, vectors, embed_fn) in spelled.items():
        print(f"\nnearest neighbours of words not in the vocabulary, {tool}:")
        for word, found in evaluate.neighbors(vocab, vectors, unseen, topn=6, embed_fn=embed_fn).items():
            print(f"  {word}: " + ", ".join(f"{w} {c:.2f}" for w, c in found))


def main():
    args = parse_args()
    corpus = data.load_corpus(args.dataset, cache_dir=args.cache_dir)  # built here, before any clock starts
    print(f"{corpus.name}: {len(corpus):,} tokens, {len(corpus.words):,} words; {args.threads} threads, "
          f"{args.epochs} epochs, d=100")
    rows, spelled = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus_txt = tmp / "corpus.txt"
        write_corpus_text(corpus, corpus_txt)
        for tool in args.tools:
            row, words, vectors, embed_fn = train(tool, args, corpus_txt, tmp)
            rows[tool] = {**row, **scores(words, vectors, embed_fn)}
            if embed_fn is not None:
                spelled[tool] = (words, vectors, embed_fn)
            print(f"{tool}: {rows[tool]['wall']:.1f} s", flush=True)
        print_table(rows, len(evaluate.load_pairs(EVAL / "rw_stanford.tsv")))
        print_neighbours(spelled, corpus.words)


if __name__ == "__main__":
    main()
