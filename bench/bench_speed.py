"""Speed, memory and quality of our trainer against gensim, on the same corpus and threads.

    python bench/bench_speed.py [--dataset ../shared/corpora/gutenberg] [--threads 2]

Prints, for each setting (d=100 with 5 negatives, d=200 with 10): wall time, corpus words/s,
peak RSS and WS353 / SimLex-999 / MEN / analogy for gensim's Word2Vec(sg=1) and for
`python trainer.py` with the same hyperparameters. The comparison is strict: our whole run,
from process start to exit (corpus cache already built, PIP loss off), against gensim's
training call alone. Then corpus building speed, cached loading time, and peak memory when
the corpus is repeated 20 times. Each run is its own process so its peak RSS is its own.

    python bench/bench_speed.py --skip 100 200 building memory   # start-up and tail only

"outside the epochs": the wall and CPU time of `trainer.py --pip-interval 0 --export FILE` on a
cached corpus (numba's cache warm) less the epoch times it prints, then where that time goes.
"""
import argparse
import json
import re
import resource
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


# Times the stages of one run of the trainer's command line, each by wrapping the function that
# does it (wall and CPU seconds); the rest of the process is Python's start and exit.
STAGES_CHILD = """
import json, signal, sys, time
clock = lambda: (time.perf_counter(), time.process_time())
start = clock()
sys.path.insert(0, {root!r})
import trainer, checkpoint, engines, export
stages = {{"imports": [clock()[i] - start[i] for i in (0, 1)]}}
def timed(owner, name, label):
    function = getattr(owner, name)
    def wrapper(*args, **kwargs):
        begin = clock()
        try:
            return function(*args, **kwargs)
        finally:
            spent = stages.setdefault(label, [0.0, 0.0])
            for i in (0, 1):
                spent[i] += clock()[i] - begin[i]
    setattr(owner, name, wrapper)
for owner, name, label in {stages!r}:
    timed(getattr(sys.modules[owner], name.split(".")[0]) if "." in name else sys.modules[owner],
          name.split(".")[-1], label)
signal.signal(signal.SIGINT, signal.default_int_handler)
trainer.install_cli_reporting()
trainer.WAIT_FOR_PICTURES = False
code = trainer.main({argv!r})
stages["in Python"] = [clock()[i] - start[i] for i in (0, 1)]
print(json.dumps(stages), flush=True)
trainer.exit_without_teardown(code)
"""
STAGES = (("trainer", "Run.__init__", "set-up (corpus, model, engine)"),
          ("engines", "Engine._warm_up", "  of which numba's first kernel load"), ("engines", "Engine.run", "epochs"),
          ("trainer", "on_epoch_end", "epoch ends"), ("checkpoint", "save", "  of which checkpoints"),
          ("export", "write_projector_snapshot", "  of which projector snapshot"), ("trainer", "finish_run", "run end"),
          ("export", "write_word2vec", "  of which --export"), ("trainer", "write_pictures", "  of which pictures"))


def cpu_seconds_of_children():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_child(cmd):
    """Run cmd; return (wall s, CPU s of the process and its threads, stdout)."""
    cpu, start = cpu_seconds_of_children(), time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return time.time() - start, cpu_seconds_of_children() - cpu, out


def outside_epochs(args, tmp, runs=3):
    """Wall and CPU time of the trainer's whole process less its epochs, then a stage profile."""
    argv = ["--dataset", args.dataset, "--cache-dir", args.cache_dir, "--num-threads", str(args.threads),
            "--pip-interval", "0", "--export", str(tmp / "v.txt"), "--log-dir", str(tmp / "runs")]
    cmd = [sys.executable, str(ROOT / "trainer.py"), *argv]
    subprocess.run(cmd, capture_output=True, check=True)  # numba's cache and the corpus cache warm
    print(f"\ntime outside the epochs: {' '.join(cmd[1:])}")
    for _ in range(runs):
        wall, cpu, out = timed_child(cmd)
        epochs = sum(float(t) for t in re.findall(r"epoch time ([0-9.e+-]+)", out))
        print(f"  wall {wall:.2f} s - epochs {epochs:.2f} s = {wall - epochs:.2f} s outside; CPU {cpu:.2f} s in all")
    child = STAGES_CHILD.format(root=str(ROOT), argv=argv, stages=STAGES)
    wall, cpu, out = timed_child([sys.executable, "-c", child])
    spent = json.loads(out.strip().splitlines()[-1])
    in_python = spent.pop("in Python")
    rows = [("imports", *spent["imports"])] + [(label, *spent.get(label, (0.0, 0.0))) for *_, label in STAGES]
    top = [row for row in rows if row[0][0] != " "]
    rows.append(("other (checks, progress, logging)", *(in_python[i] - sum(r[i + 1] for r in top) for i in (0, 1))))
    rows.append(("Python's start and exit", wall - in_python[0], cpu - in_python[1]))
    print(f"  one run, stage by stage: wall {wall:.2f} s, outside the epochs {wall - spent['epochs'][0]:.2f} s "
          "(the pictures' child process, which draws after the exit, not counted)")
    print(f"    {'':36}{'wall s':>7}{'CPU s':>7}")
    for label, wall_s, cpu_s in rows:
        print(f"    {label:36}{wall_s:7.2f}{cpu_s:7.2f}")


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
    parser.add_argument("--skip", nargs="*", default=[], choices=["100", "200", "building", "memory", "outside"],
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
        if "outside" not in args.skip:
            outside_epochs(args, tmp)
