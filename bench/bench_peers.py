"""Speed, memory and quality of our trainer against the C/C++ peers and gensim, one tool after another.

    python bench/bench_peers.py [--settings 100:5 200:10] [--tools ours pword2vec-blas ...]
                                [--threads 2] [--repeats 1] [--epochs 5] [--corpus-repeats 1]

Builds the peers with ../shared/peers/build.sh (word2vec C; pWord2Vec with plain loops and with
OpenBLAS sgemm; fastText), then trains every tool on the same tokens: our corpus cache is written
out as one sentence a line, which the peers and gensim read (a newline ends a sentence for all of
them), while our trainer reads the corpus folder through that very cache. With --corpus-repeats N
every tool reads that text N times over, ours too (its cache built in the temporary folder before
any clock starts). Skip-gram with negative sampling, window 5, sample 1e-3, min count 5, linear
learning rate from --lr (0.025); fastText without character n-grams (-minn 0 -maxn 0 -bucket 0),
the same model as the others.

Every tool runs at its best: OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE, which some machines set and
which can pin OpenBLAS to slower kernels, are removed from the environment. The first lines name
the CPU, its vector ISA (AVX2, AVX-512) and the OpenBLAS core pWord2Vec_blas runs on (as
OPENBLAS_VERBOSE=2 makes OpenBLAS print it).

For each tool and setting (d:negatives) it prints the wall time of the whole process, from
start to exit (our corpus cache built beforehand, PIP loss off), corpus words/s (corpus tokens
x epochs / wall), peak RSS, WordSim353 / SimLex / MEN / Rare Words Spearman rho, Google analogy
accuracy (3CosAdd, 30,000 most frequent words), and our ratio to each. With --repeats N the
tools run in turn N times (forward, then backward order, and so on), and the summary gives the
median wall time with its range.

word2vec C at the shared commit never clears its end-of-file flag between epochs, so the thread
that reads to the end of the file (with 2 threads, the second half of the corpus) trains one
epoch, not --epochs: its time and vectors are those of less training than the others get.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from paths import GUTENBERG, PEERS, ROOT
import data  # noqa: E402
import evaluate  # noqa: E402
from bench_speed import quality, run_child  # noqa: E402

TOOLS = ("ours", "pword2vec-blas", "pword2vec", "word2vec", "fasttext", "gensim")
PEER_BINARIES = {"pword2vec-blas": "pWord2Vec_blas", "pword2vec": "pWord2Vec", "word2vec": "word2vec",
                 "fasttext": "fasttext"}
SLOWING_ENV = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")  # pin OpenBLAS's kernels and blocking: unset for every tool
DIMS = (50, 100, 200, 300)

GENSIM_CHILD = """
import json, sys, time
from gensim.models import Word2Vec
with open({corpus!r}) as f:
    sentences = [line.split() for line in f]
model = Word2Vec(sg=1, vector_size={dim}, window=5, min_count=5, sample=1e-3, negative={neg}, alpha={alpha},
                 workers={threads}, epochs={epochs}, seed={seed})
model.build_vocab(sentences)
start = time.time()
model.train(sentences, total_examples=len(sentences), epochs={epochs})
seconds = time.time() - start
model.wv.save_word2vec_format({out!r})
print(json.dumps({{"train_seconds": seconds}}))
"""


def parse_setting(text):
    """'D' or 'D:K' -> (d, negatives); K defaults to 5 up to d=100, else 10."""
    dim, _, neg = text.partition(":")
    if not dim.isdigit() or int(dim) not in DIMS or (neg and not neg.isdigit()):
        raise argparse.ArgumentTypeError(f"setting {text!r}: want D or D:K with D in {DIMS}")
    return int(dim), int(neg) if neg else (5 if int(dim) <= 100 else 10)


def write_corpus_text(corpus, path, repeats=1):
    """Our tokens, one sentence a line, space-separated, repeats times over: what the peers and gensim read."""
    bounds = list(corpus.sentence_starts) + [len(corpus.token_ids)]
    words = corpus.words
    text = "".join(" ".join(words[i] for i in corpus.token_ids[lo:hi]) + "\n"
                   for lo, hi in zip(bounds[:-1], bounds[1:]))
    with open(path, "w") as out:
        for _ in range(repeats):
            out.write(text)


def tool_env(args):
    """The environment every tool runs in: ours, without what slows OpenBLAS."""
    env = {k: v for k, v in os.environ.items() if k not in SLOWING_ENV}
    return {**env, "OMP_NUM_THREADS": str(args.threads)}


def describe_machine(args):
    """The CPU, its widest vector ISA and the OpenBLAS core pWord2Vec_blas picks in tool_env."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    field = lambda name: next((line.split(":", 1)[1].strip() for line in info.splitlines()
                               if line.startswith(name)), "?")
    flags = set(field("flags").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    extras = " ".join(sorted(f for f in flags if f.startswith(("avx512", "amx"))))
    print(f"CPU: {field('model name')} (family {field('cpu family')}, model {field('model')}), {os.cpu_count()} "
          f"cores visible; vector ISA: {isa}{f' ({extras})' if extras else ''}")
    blas = Path(args.peers_dir) / PEER_BINARIES["pword2vec-blas"]
    if blas.exists():
        probe = subprocess.run([str(blas)], env={**tool_env(args), "OPENBLAS_VERBOSE": "2"}, capture_output=True,
                               text=True)
        core = next((line.split(":", 1)[1].strip() for line in (probe.stdout + probe.stderr).splitlines()
                     if line.startswith("Core:")), "not printed")
        unset = ", ".join(f"{k}={os.environ[k]}" for k in SLOWING_ENV if k in os.environ) or "none set here"
        print(f"OpenBLAS core of pWord2Vec_blas: {core} (unset for every tool: {unset})")


def warm_ours(corpus_txt, tmp):
    """A short run of ours before any clock starts: a first run after a change compiles numba's
    kernels into its cache, and no user pays that twice."""
    sample = tmp / "warm-up.txt"
    with open(corpus_txt) as text:
        sample.write_text("".join(line for _, line in zip(range(2000), text)))
    subprocess.run([sys.executable, str(ROOT / "trainer.py"), "--dataset", str(sample), "--cache-dir",
                    str(tmp / "warm-up-cache"), "--epochs", "1", "--pip-interval", "0", "--quiet", "--log-dir",
                    str(tmp / "runs"), "--export", str(tmp / "warm-up.vec")], check=True, capture_output=True)


def tool_command(tool, args, dim, neg, corpus_txt, out, tmp, seed):
    """The command line that trains `tool` and writes word2vec-format vectors to out."""
    if tool == "ours":
        return [sys.executable, str(ROOT / "trainer.py"), "--dataset", args.ours_dataset, "--cache-dir",
                args.ours_cache, "--embed-size", str(dim), "--neg-sample-size", str(neg), "--epochs", str(args.epochs),
                "--window-size", "5", "--subsample-th", "1e-3", "--remove-th", "5", "--lr", str(args.lr),
                "--num-threads", str(args.threads), "--seed", str(seed), "--pip-interval", "0", "--quiet",
                "--log-dir", str(tmp / "runs"), "--export", str(out)]
    if tool == "gensim":
        return [sys.executable, "-c", GENSIM_CHILD.format(corpus=str(corpus_txt), dim=dim, neg=neg, alpha=args.lr,
                                                          threads=args.threads, epochs=args.epochs,
                                                          seed=seed, out=str(out))]
    binary = PEER_BINARIES[tool]
    if tool == "fasttext":
        return [str(Path(args.peers_dir) / binary), "skipgram", "-input", str(corpus_txt), "-output",
                str(out.with_suffix("")), "-dim", str(dim), "-ws", "5", "-neg", str(neg), "-t", "1e-3",
                "-thread", str(args.threads), "-epoch", str(args.epochs), "-minCount", "5", "-minn", "0", "-maxn", "0",
                "-bucket", "0", "-lr", str(args.lr), "-verbose", "0"]
    common = ["-train", str(corpus_txt), "-output", str(out), "-size", str(dim), "-window", "5",
              "-negative", str(neg), "-sample", "1e-3", "-threads", str(args.threads), "-iter", str(args.epochs),
              "-min-count", "5", "-binary", "0", "-alpha", str(args.lr)]
    if tool == "word2vec":
        return [str(Path(args.peers_dir) / binary), *common, "-cbow", "0", "-hs", "0"]
    return [str(Path(args.peers_dir) / binary), *common, "-batch-size", "11"]


def run_tool(tool, args, dim, neg, corpus_txt, n_tokens, tmp, seed):
    """Train once; returns the row of figures."""
    out = tmp / f"{tool}-{dim}.{'vec' if tool == 'fasttext' else 'txt'}"  # fastText adds .vec to its -output
    wall, rss, _ = run_child(tool_command(tool, args, dim, neg, corpus_txt, out, tmp, seed), env=tool_env(args))
    row = {"wall": wall, "words/s": n_tokens * args.epochs / wall, "rss": rss,
           **quality(*evaluate.load_vectors(out))}
    out.unlink()
    out.with_suffix(".bin").unlink(missing_ok=True)
    return row


def print_runs(tool, rows):
    for row in rows:
        print(f"{tool:16}{row['wall']:8.1f}{row['words/s']:11,.0f}{row['rss']:9.0f}{row['WS353']:8.3f}"
              f"{row['SimLex']:8.3f}{row['MEN']:8.3f}{row['RW']:8.3f}{100 * row['analogy']:8.1f}%", flush=True)


def summary(rows):
    """Median wall time (and words/s) with its range, mean of the quality figures."""
    walls = [row["wall"] for row in rows]
    mean = {key: statistics.fmean(row[key] for row in rows) for key in ("WS353", "SimLex", "MEN", "RW", "analogy")}
    return {"wall": statistics.median(walls), "low": min(walls), "high": max(walls),
            "rss": max(row["rss"] for row in rows), **mean}


def print_ratios(results):
    ours = summary(results["ours"])
    ours_mean3 = (ours["WS353"] + ours["SimLex"] + ours["MEN"]) / 3
    for tool, rows in results.items():
        if tool == "ours":
            continue
        peer = summary(rows)
        mean3 = (peer["WS353"] + peer["SimLex"] + peer["MEN"]) / 3
        print(f"ours vs {tool}: speed {peer['wall'] / ours['wall']:.2f}x (median walls {ours['wall']:.1f} s "
              f"[{ours['low']:.1f}-{ours['high']:.1f}] vs {peer['wall']:.1f} s "
              f"[{peer['low']:.1f}-{peer['high']:.1f}]), "
              f"peak RSS {ours['rss']:.0f} vs {peer['rss']:.0f} MiB; mean rho WS353/SimLex/MEN "
              f"{ours_mean3 - mean3:+.3f}, RW {ours['RW'] - peer['RW']:+.3f}, "
              f"analogy {100 * (ours['analogy'] - peer['analogy']):+.1f} points")


def compare(args, dim, neg, corpus_txt, n_tokens, tmp):
    print(f"\nd={dim}, {neg} negatives, window 5, min count 5, sample 1e-3, lr {args.lr}, {args.epochs} epochs, "
          f"{args.threads} threads, {n_tokens:,} corpus tokens")
    print(f"{'tool':16}{'wall s':>8}{'words/s':>11}{'RSS MiB':>9}{'WS353':>8}{'SimLex':>8}{'MEN':>8}"
          f"{'RW':>8}{'analogy':>9}")
    results = {tool: [] for tool in args.tools}
    for repeat in range(args.repeats):
        order = args.tools if repeat % 2 == 0 else args.tools[::-1]
        for tool in order:
            row = run_tool(tool, args, dim, neg, corpus_txt, n_tokens, tmp, args.seed + repeat)
            results[tool].append(row)
            print_runs(tool, [row])
    if "ours" in results:
        print_ratios(results)


def build_peers(args):
    needed = PEER_BINARIES
    if any(not (Path(args.peers_dir) / needed[t]).exists() for t in args.tools if t in needed) or args.rebuild:
        subprocess.run(["bash", str(PEERS / "build.sh"), args.peers_dir], check=True,
                       stdout=subprocess.DEVNULL)


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(GUTENBERG), help="corpus to train on")
    parser.add_argument("--cache-dir", default=str(ROOT / "data" / "cache"), help="our corpus cache folder")
    parser.add_argument("--settings", nargs="+", type=parse_setting, default=[(100, 5), (200, 10)],
                        metavar="D[:K]", help=f"dimension D in {DIMS} and negatives K (default 5 up to d=100, "
                                              "else 10); default: 100:5 200:10")
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS), help="tools to run, in this order")
    parser.add_argument("--threads", type=int, default=2, help="threads for every tool")
    parser.add_argument("--epochs", type=int, default=5, help="passes over the corpus")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each tool per setting, the tools alternating")
    parser.add_argument("--corpus-repeats", type=int, default=1,
                        help="every tool reads the corpus this many times over (6: about 18M tokens of the shared one)")
    parser.add_argument("--lr", type=float, default=0.025, help="starting learning rate of every tool")
    parser.add_argument("--seed", type=int, default=1,
                        help="seed of the first run of ours and gensim; run r takes seed + r, so the quality means "
                             "cover seeds, not only thread timings (the peers have none)")
    parser.add_argument("--peers-dir", default="/tmp/sgns-peers", help="where build.sh puts the peers")
    parser.add_argument("--rebuild", action="store_true", help="build the peers even when they are there")
    return parser


if __name__ == "__main__":
    args = get_parser().parse_args()
    build_peers(args)
    describe_machine(args)
    corpus = data.load_corpus(args.dataset, cache_dir=args.cache_dir)  # built before any clock starts
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus_txt = tmp / "corpus.txt"
        write_corpus_text(corpus, corpus_txt, args.corpus_repeats)
        args.ours_dataset, args.ours_cache, n_tokens = args.dataset, args.cache_dir, len(corpus)
        if args.corpus_repeats > 1:  # ours reads the very text the peers read, its cache built here and now
            args.ours_dataset, args.ours_cache = str(corpus_txt), str(tmp / "cache")
            n_tokens = len(data.load_corpus(args.ours_dataset, cache_dir=args.ours_cache))
        if "ours" in args.tools:
            warm_ours(corpus_txt, tmp)
        for dim, neg in args.settings:
            compare(args, dim, neg, corpus_txt, n_tokens, tmp)
