"""--async's dense and sparse exchanges side by side, against one process: words/s, bytes, exchange time, peak RSS.

    python bench/zipf_corpus.py /tmp/zipf-1m.txt                                  # once: 60M words, V = 1.0M (~2 min)
    NLTK_DATA=../shared/nltk_data python bench/bench_async_exchange.py --zipf /tmp/zipf-1m.txt   # ~25 min on 2 idle cores
    python bench/bench_async_exchange.py --settings 60k --repeats 3                # one setting only

Settings: the shared Gutenberg corpus at V = 21k (--remove-th 5) and V = 60k (--remove-th 1), d=200,
and a synthetic Zipf corpus (bench/zipf_corpus.py) at V = 1M, d=100; the trainer's defaults
otherwise (batch 4096, so an exchange every 50 steps, window 5, 5 negatives, --block-momentum 0).
Each setting trains one epoch three ways: one process, and 2 --async ranks (Gloo on
127.0.0.1) with --async-exchange dense and sparse; one thread a process, the compiled kernel
(the trainer's engine for these runs), each run in fresh processes so that peak RSS is its own.
At V = 1M a dense exchange moves 400 MB, so the dense run trains only the first --dense-words
words of the corpus (same vocabulary and tables). Rounds alternate the three runs; each run's
fastest epoch is kept and the spread of the ratios is printed.

Per run: epoch seconds and words/s (corpus words over the epoch's time, the closing exchange
included), and for the ranks, per exchange: bytes a rank puts into the all-reduces (the flags
of a sparse exchange included), rows they carry (both tables), seconds at sync points (passes
and waits); bytes per word a rank trains; peak RSS of each process. "ideal" is rows x d x 2
bytes (bfloat16): what the changed rows alone weigh.
"""
import argparse
import os
import resource
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import cpu_kernel  # noqa: E402
import data  # noqa: E402
import distributed  # noqa: E402
import engines  # noqa: E402
from model import SGNS  # noqa: E402

SHARED = ROOT.parent / "shared" / "corpora" / "gutenberg"
SETTINGS = {"21k": (SHARED, 5, 200), "60k": (SHARED, 1, 200), "1M": (None, 1, 100)}  # dataset, --remove-th, d


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prefix(corpus, words):
    """The corpus cut after its first `words` tokens (whole sentences), with the full vocabulary and counts."""
    if not words or words >= len(corpus):
        return corpus
    starts = corpus.sentence_starts[corpus.sentence_starts < words]
    return data.Corpus(corpus.name, corpus.words, corpus.counts, corpus.token_ids[:words], starts, corpus.hash,
                       corpus.cache_dir)


def engine_args(dim):
    """The run options the engine reads: the trainer's defaults for sgns on the CPU."""
    return argparse.Namespace(seed=1, batch_size=4096, window_size=5, neg_sample_size=5, epochs=1, lr=0.025,
                              ns_exponent=0.75, subsample_th=1e-3, multi_gpu=False, model_name="sgns",
                              gpu_kernel=True, cuda_graph=True, embed_size=dim)


def _run(rank, world_size, init, dataset, cache_dir, remove_th, dim, words, exchange, results):
    """One epoch of one process (world_size 1) or of one --async rank; its figures into results[rank]."""
    cpu_kernel.set_threads(1)
    torch.set_num_threads(1)
    corpus = prefix(data.load_corpus(str(dataset), cache_dir=str(cache_dir), min_count=remove_th), words)
    args = engine_args(dim)
    torch.manual_seed(args.seed)
    model = SGNS(len(corpus.words), dim)
    strategy = distributed.OneProcess()
    if world_size > 1:
        distributed.join_group("gloo", init, rank, world_size, timeout=600)
        world = distributed.World(rank, world_size, rank, "gloo", init, 600, "cpu")
        strategy = distributed.AsyncRanks(world, distributed.default_sync_interval(args.batch_size), 0.0, exchange)
    try:
        engine = engines.Engine(args, model, None, corpus, strategy, "kernel", "cpu")
        distributed.start_together()
        began = time.perf_counter()
        engine.run_epoch(0, 0, lambda *a: None, lambda: 0)
        seconds = time.perf_counter() - began
        figures = {"seconds": seconds, "words": len(corpus), "vocab": len(corpus.words),
                   "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        if world_size > 1:
            stats = strategy.averager.stats
            figures.update(mode=strategy.averager.mode, exchanges=stats.exchanges, bytes=stats.bytes,
                           rows=stats.rows, exchange_s=stats.seconds)
        results[rank] = figures
    finally:
        if world_size > 1:
            finished = distributed.leave_together()
            torch.distributed.destroy_process_group()
            del finished


def run(dataset, cache_dir, remove_th, dim, words, procs, exchange):
    """Figures of every process of one run (fresh processes)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_run, args=(procs, f"tcp://127.0.0.1:{free_port()}", dataset, cache_dir, remove_th, dim,
                                       words, exchange, results), nprocs=procs, start_method="spawn")
        return [dict(results[r]) for r in range(procs)]


def describe(name, figures, one_process, dim):
    """A table row: the run's words/s, its ratio to one process, and the exchange's figures."""
    first = figures[0]
    words_per_s = first["words"] / max(f["seconds"] for f in figures)
    ratio = words_per_s / (one_process["words"] / one_process["seconds"])
    rss = " / ".join(f"{f['rss_gb']:.2f}" for f in figures)
    if "exchanges" not in first:
        return f"| {name} | 1 | - | {words_per_s:,.0f} | 1.00x | - | - | - | - | - | {rss} |"
    n = max(first["exchanges"], 1)
    per_exchange, rows = first["bytes"] / n, first["rows"] / n
    ideal = rows * dim * 2
    per_word = first["bytes"] / (first["words"] / len(figures))
    return (f"| {name} | 2 | {first['mode']} | {words_per_s:,.0f} | {ratio:.2f}x | {per_exchange / 1e6:,.2f} MB "
            f"({per_exchange / ideal:.2f}x ideal) | {rows:,.0f} | {per_word:,.0f} | "
            f"{first['exchange_s'] / n * 1e3:.1f} ms ({first['exchange_s'] / first['seconds']:.0%}) | {n} | {rss} |")


def bench_setting(label, args):
    dataset, remove_th, dim = SETTINGS[label]
    dataset = dataset or args.zipf
    corpus = data.load_corpus(str(dataset), cache_dir=str(args.cache_dir), min_count=remove_th)  # built once, here
    dense_words = args.dense_words if label == "1M" else 0
    print(f"\n### V = {len(corpus.words):,} ({dataset.name}, --remove-th {remove_th}), d={dim}: "
          f"{len(corpus):,} words" + (f"; the dense run trains the first {dense_words:,}" if dense_words else ""),
          flush=True)
    del corpus
    runs = {"1 process": (1, "auto", 0), "dense": (2, "dense", dense_words), "sparse": (2, "sparse", 0)}
    best, ratios = {}, {name: [] for name in runs}
    for repeat in range(args.repeats):
        for name, (procs, exchange, words) in runs.items():
            figures = run(dataset, args.cache_dir, remove_th, dim, words, procs, exchange)
            speed = figures[0]["words"] / max(f["seconds"] for f in figures)
            print(f"  round {repeat + 1}, {name}: {speed:,.0f} words/s", flush=True)
            if name == "1 process":
                one = figures[0]
            else:
                ratios[name].append(speed / (one["words"] / one["seconds"]))
            if name not in best or speed > best[name][0]:
                best[name] = (speed, figures)
    print("\n| setting | processes | exchange | words/s | vs 1 process | bytes per exchange (a rank) | rows per "
          "exchange | bytes per trained word | time per exchange (share of the epoch) | exchanges | peak RSS "
          "per process (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    one_best = best["1 process"][1][0]
    for name in runs:
        print(describe(f"V={label}, d={dim}", best[name][1], one_best, dim))
    print("ratios to one process, every round (fastest 1-process epoch): "
          + "; ".join(f"{name} {', '.join(f'{r:.2f}x' for r in rs)}" for name, rs in ratios.items() if rs))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zipf", type=Path, default=None,
                   help="the synthetic corpus of bench/zipf_corpus.py for the V = 1M setting (without it: skipped)")
    p.add_argument("--settings", nargs="+", default=["21k", "60k", "1M"], choices=list(SETTINGS))
    p.add_argument("--repeats", type=int, default=2, help="rounds of the three runs of each setting")
    p.add_argument("--dense-words", type=int, default=3_000_000,
                   help="words the dense run trains at V = 1M (its exchanges move the whole tables)")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "data" / "cache", help="corpus cache of the trainer")
    args = p.parse_args()
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPU cores, load average {load:.2f} at the start; one thread a process, 1 epoch a run")
    for label in args.settings:
        if label == "1M" and args.zipf is None:
            print("\nV = 1M skipped: give --zipf (bench/zipf_corpus.py writes it)")
            continue
        bench_setting(label, args)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
