"""Speed, memory and quality of our trainer against gensim, on the same corpus and threads.

    python bench/bench_speed.py [--dataset ../shared/corpora/gutenberg] [--threads 2]

Prints, for each setting (d=100 with 5 negatives, d=200 with 10): wall time, corpus words/s,
peak RSS and WS353 / SimLex-999 / MEN / analogy for gensim's Word2Vec(sg=1) and for
`python trainer.py` with the same hyperparameters. The comparison is strict: our whole run,
from process start to exit (corpus cache already built, PIP loss off), against gensim's
training call alone. Then corpus building speed, cached loading time, and peak memory when
the corpus is repeated 20 times. Each run is its own process so its peak RSS is its own.
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from paths import EVAL, GUTENBERG, ROOT
import data  # noqa: E402
import evaluate  # noqa: E402


# Linux counts the memory a process had when it forked into its child's peak RSS, so the
# command is started from a small launcher process, not from this (large) one.
LAUNCHER = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def run_child(cmd, env=None):
    """Run a command (in environment env, default ours); return (wall s, peak RSS in MiB, stdout)."""
    start = time.time()
    proc = subprocess.run([sys.executable, "-c", LAUNCHER, *cmd], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed with exit code {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.time() - start, int(proc.stderr.strip().splitlines()[-1]) / 1024, proc.stdout


GENSIM_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
import data
from gensim.models import Word2Vec
corpus = data.load_corpus({dataset!r}, cache_dir={cache!r})
bounds = list(corpus.sentence_starts) + [len(corpus.token_ids)]
words = corpus.words
sentences = [[words[i] for i in corpus.token_ids[a:b]] for a, b in zip(bounds[:-1], bounds[1:])]
model = Word2Vec(sg=1, vector_size={dim}, window=5, min_count=5, sample=1e-3, negative={neg},
                 workers={threads}, epochs=5, seed=1)
model.build_vocab(sentences)
start = time.time()
model.train(sentences, total_examples=len(sentences), epochs=5)
seconds = time.time() - start
model.wv.save_word2vec_format({out!r})
print(json.dumps({{"train_seconds": seconds, "tokens": int(len(corpus.token_ids))}}))
"""


def quality(words, vectors):
    """WS353, SimLex, MEN and Rare Words Spearman rho and Google analogy accuracy of the vectors."""
    row = {}
    for name, file in (("WS353", "wordsim353.tsv"), ("SimLex", "simlex999.tsv"), ("MEN", "men3000.tsv"),
                       ("RW", "rw_stanford.tsv")):
        row[name] = evaluate.similarity(words, vectors, evaluate.load_pairs(EVAL / file))["spearman"]
    row["analogy"] = evaluate.analogy(words, vectors, EVAL / "questions-words.txt")["accuracy"]
    return row


def compare(args, dim, neg, tmp):
    n_tokens = len(data.load_corpus(args.dataset, cache_dir=args.cache_dir))
    gensim_out = tmp / f"gensim-{dim}.txt"
    wall, rss, out = run_child([sys.executable, "-c", GENSIM_CHILD.format(
        root=str(ROOT), dataset=args.dataset, cache=args.cache_dir, dim=dim, neg=neg, threads=args.threads,
        out=str(gensim_out))])
    info = json.loads(out.strip().splitlines()[-1])
    gensim = {"seconds": info["train_seconds"], "wall": wall, "rss": rss,
              "words/s": n_tokens * 5 / info["train_seconds"], **quality(*evaluate.load_vectors(gensim_out))}

    ours_out = tmp / f"ours-{dim}.txt"
    wall, rss, _ = run_child([sys.executable, str(ROOT / "trainer.py"), "--dataset", args.dataset, "--cache-dir",
                              args.cache_dir, "--embed-size", str(dim), "--neg-sample-size", str(neg), "--epochs", "5",
                              "--num-threads", str(args.threads), "--pip-interval", "0", "--quiet",
                              "--log-dir", str(tmp / "runs"), "--export", str(ours_out)])
    ours = {"seconds": wall, "wall": wall, "rss": rss, "words/s": n_tokens * 5 / wall,
            **quality(*evaluate.load_vectors(ours_out))}
    return gensim, ours


def print_comparison(dim, neg, gensim, ours):
    print(f"\nd={dim}, {neg} negatives, window 5, min count 5, sample 1e-3, 5 epochs, {args.threads} threads")
    print(f"{'':8}{'time s':>9}{'words/s':>11}{'RSS MiB':>9}{'WS353':>8}{'SimLex':>8}{'MEN':>8}{'analogy':>9}")
    for name, row in (("gensim", gensim), ("ours", ours)):
        print(f"{name:8}{row['seconds']:9.1f}{row['words/s']:11,.0f}{row['rss']:9.0f}{row['WS353']:8.3f}"
              f"{row['SimLex']:8.3f}{row['MEN']:8.3f}{100 * row['analogy']:8.1f}%")
    print(f"ratio: throughput {ours['words/s'] / gensim['words/s']:.2f}x gensim (our whole run vs gensim's train call); "
          f"WS353 {ours['WS353'] - gensim['WS353']:+.3f}, SimLex {ours['SimLex'] - gensim['SimLex']:+.3f}, "
          f"MEN {ours['MEN'] - gensim['MEN']:+.3f}, analogy {100 * (ours['analogy'] - gensim['analogy']):+.1f} points")


def corpus_building(args, tmp):
    cache = tmp / "fresh-cache"
    start = time.time()
    corpus = data.load_corpus(args.dataset, cache_dir=str(cache))
    build = time.time() - start
    start = time.time()
    data.load_corpus(args.dataset, cache_dir=str(cache))
    load = time.time() - start
    print(f"\ncorpus building: {len(corpus):,} tokens in {build:.2f} s = {len(corpus) / build:,.0f} tokens/s "
          f"(tokenise, count, encode, write cache); loading the cache: {load:.3f} s")


def memory_scaling(args, tmp, repeat=20):
    """Peak RSS of one epoch on the corpus and on the corpus repeated `repeat` times."""
    big = tmp / "repeated"
    big.mkdir()
    with open(big / "all.txt", "wb") as out:
        for _ in range(repeat):
            for path in data.resolve_dataset(args.dataset).files:
                with open(path, "rb") as f:
                    shutil.copyfileobj(f, out)
                out.write(b"\n\n")
    rows = {}
    for name, dataset in (("1x", args.dataset), (f"{repeat}x", str(big))):
        # the cache is built outside the measure, in its own process (building 60M tokens takes 2 GB)
        out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r}); import data; "
                              f"print(len(data.load_corpus({dataset!r}, cache_dir={args.cache_dir!r})))"],
                             capture_output=True, text=True, check=True).stdout
        n_tokens = int(out.strip().splitlines()[-1])
        _, rss, _ = run_child([sys.executable, str(ROOT / "trainer.py"), "--dataset", dataset, "--cache-dir",
                               args.cache_dir, "--epochs", "1", "--num-threads", str(args.threads), "--pip-interval",
                               "0", "--quiet", "--log-dir", str(tmp / "runs")])
        rows[name] = (n_tokens, rss)
    (n1, rss1), (n20, rss20) = rows["1x"], rows[f"{repeat}x"]
    token_array = n20 * 4 / 2**20
    bound = 1.5 * rss1 + token_array
    print(f"\nmemory, one epoch: {n1:,} tokens -> peak {rss1:.0f} MiB; {n20:,} tokens ({repeat}x) -> peak "
          f"{rss20:.0f} MiB; bound 1.5 x {rss1:.0f} + token array {token_array:.0f} = {bound:.0f} MiB: "
          f"{'within' if rss20 < bound else 'OVER'}")
    shutil.rmtree(big)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(GUTENBERG),
                        help="corpus to train on")
    parser.add_argument("--cache-dir", default=str(ROOT / "data" / "cache"), help="corpus cache folder")
    parser.add_argument("--threads", type=int, default=2, help="threads for gensim and for us")
    parser.add_argument("--skip", nargs="*", default=[], choices=["100", "200", "building", "memory"],
                        help="parts to leave out")
    args = parser.parse_args()
    data.load_corpus(args.dataset, cache_dir=args.cache_dir)  # the strict comparison starts with a built cache
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for dim, neg in ((100, 5), (200, 10)):
            if str(dim) not in args.skip:
                print_comparison(dim, neg, *compare(args, dim, neg, tmp))
        if "building" not in args.skip:
            corpus_building(args, tmp)
        if "memory" not in args.skip:
            memory_scaling(args, tmp)
