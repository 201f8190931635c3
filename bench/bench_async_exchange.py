"""--async's dense and sparse exchanges side by side, against one process: words/s, bytes, exchange time, peak RSS.

    python bench/zipf_corpus.py /tmp/zipf-1m.txt                # once: 60M words, V = 1.0M (6 min, then 3 to tokenise)
    python bench/bench_async_exchange.py --zipf /tmp/zipf-1m.txt --with-sync --repeats 1 --json parts.json  # 22 min
    python bench/bench_async_exchange.py --settings 60k 21k --repeats 2           # the shared corpus only: 4 min
    python bench/model_machines.py parts.json                                    # the model of N machines

Settings: the shared Gutenberg corpus at V = 21k (--remove-th 5) and V = 60k (--remove-th 1), d=200,
and a synthetic Zipf corpus (bench/zipf_corpus.py) at V = 1M, d=100; the trainer's defaults
otherwise (batch 4096, so an exchange every 50 steps, window 5, 5 negatives, --block-momentum 0).
Each setting trains one epoch three ways: one process, and 2 --async ranks (Gloo on
127.0.0.1) with --async-exchange dense and sparse; one thread a process, the compiled kernel
(the trainer's engine for these runs), each run in fresh processes so that peak RSS is its own.
At V = 1M a dense exchange moves 400 MB, so the dense run trains only the first --dense-words
words of the corpus (same vocabulary and tables). Rounds alternate the three runs; each run's
fastest epoch is kept and the spread of the ratios is printed. Run times above: on this 2-core
box, loaded by other jobs; CPU seconds are recorded too (--json), which the model uses.

Per run: epoch seconds and words/s (corpus words over the epoch's time, the closing exchange
included), and for the ranks, per exchange: bytes a rank puts into the all-reduces (the flags
of a sparse exchange included), rows they carry (both tables), seconds at sync points (passes
and waits); bytes per word a rank trains; peak RSS of each process. "ideal" is rows x d x 2
bytes (bfloat16): what the changed rows alone weigh.
"""
import argparse
import json
import os
import resource
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
from bench_distributed import free_port  # noqa: E402
from model import SGNS  # noqa: E402

SHARED = ROOT.parent / "shared" / "corpora" / "gutenberg"
SETTINGS = {"21k": (SHARED, 5, 200), "60k": (SHARED, 1, 200), "1M": (None, 1, 100)}  # dataset, --remove-th, d


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


def _strategy(mode, rank, world_size, init, batch_size):
    """The distribution of a run: one process, or --async ranks (mode dense/sparse), or --sync ranks."""
    if world_size == 1:
        return distributed.OneProcess()
    distributed.join_group("gloo", init, rank, world_size, timeout=600)
    world = distributed.World(rank, world_size, rank, "gloo", init, 600, "cpu")
    if mode == "sync":
        distributed.idle_gloo_io_thread()  # as the trainer's --sync runs
        return distributed.SyncRanks(world)
    return distributed.AsyncRanks(world, distributed.default_sync_interval(batch_size), 0.0, mode)


def count_step_rows():
    """Count the distinct rows of each window step (what a --sync step sends): [rows, steps]."""
    counted, number = [0, 0], cpu_kernel.TouchedRows.number

    def counting(self, *windows):
        n = number(self, *windows)
        counted[0] += n
        counted[1] += 1
        return n
    cpu_kernel.TouchedRows.number = counting
    return counted


def _run(rank, world_size, init, dataset, cache_dir, remove_th, dim, words, mode, loop, results):
    """One epoch of one process (world_size 1) or of one rank (mode: dense/sparse async, or sync), on
    the compiled kernel or the torch engine's window steps (loop); its figures into results[rank]."""
    cpu_kernel.set_threads(1)
    torch.set_num_threads(1)
    corpus = prefix(data.load_corpus(str(dataset), cache_dir=str(cache_dir), min_count=remove_th), words)
    args = engine_args(dim)
    torch.manual_seed(args.seed)
    model = SGNS(len(corpus.words), dim)
    strategy = _strategy(mode, rank, world_size, init, args.batch_size)
    step_rows = count_step_rows()
    try:
        engine = engines.Engine(args, model, None, corpus, strategy, loop, "cpu")
        distributed.start_together()
        began, cpu_began, thread_began = time.perf_counter(), time.process_time(), time.thread_time()
        engine.run(0, 0, lambda *a: None, lambda: 0)
        figures = {"seconds": time.perf_counter() - began, "cpu_seconds": time.process_time() - cpu_began,
                   "thread_cpu_seconds": time.thread_time() - thread_began,
                   "words": len(corpus), "vocab": len(corpus.words), "step_rows": step_rows[0],
                   "steps": step_rows[1], "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
        if isinstance(strategy, distributed.AsyncRanks):
            stats = strategy.averager.stats
            figures.update(mode=strategy.averager.mode, exchanges=stats.exchanges, bytes=stats.bytes,
                           rows=stats.rows, exchange_s=stats.seconds, waited_s=stats.waited, exchange_cpu_s=stats.cpu)
        results[rank] = figures
    finally:
        if world_size > 1:
            finished = distributed.leave_together()
            torch.distributed.destroy_process_group()
            del finished


def run(dataset, cache_dir, remove_th, dim, words, procs, mode, loop):
    """Figures of every process of one run (fresh processes)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_run, args=(procs, f"tcp://127.0.0.1:{free_port()}", dataset, cache_dir, remove_th, dim,
                                       words, mode, loop, results), nprocs=procs, start_method="spawn")
        return [dict(results[r]) for r in range(procs)]


def speed(figures):
    """Corpus words per second of a run: its words over its slowest process's epoch."""
    return figures[0]["words"] / max(f["seconds"] for f in figures)


def describe(name, figures, reference, dim):
    """A table row: the run's words/s, its ratio to its one-process reference, and the exchange's figures."""
    first, rss = figures[0], " / ".join(f"{f['rss_gb']:.2f}" for f in figures)
    ratio = f"{speed(figures) / speed(reference):.2f}x"
    words_per_rank = first["words"] / len(figures)
    if first.get("exchanges"):
        n = first["exchanges"]
        per_exchange, rows = first["bytes"] / n, first["rows"] / n
        sent = (f"{per_exchange / 1e6:,.2f} MB ({per_exchange / (rows * dim * 2):.2f}x ideal) | {rows:,.0f} | "
                f"{first['bytes'] / words_per_rank:,.0f} | {(first['exchange_s'] - first['waited_s']) / n * 1e3:.1f} "
                f"+ {first['waited_s'] / n * 1e3:.1f} ms ({first['exchange_s'] / first['seconds']:.0%}) | {n}")
    elif len(figures) > 1:  # sync: each step sends its rows, (d + 3) float32 each, to the other rank
        rows = first["step_rows"] / max(first["steps"], 1)
        sent = f"{rows * (dim + 3) * 4 / 1e6:,.3f} MB | {rows:,.0f} | {rows * (dim + 3) * 4 * first['steps'] / words_per_rank:,.0f} | - | {first['steps']} steps"
    else:
        sent = "- | - | - | - | -"
    return f"| {name} | {len(figures)} | {speed(figures):,.0f} | {ratio} | {sent} | {rss} |"


def bench_setting(label, args):
    """Every run of one setting, in rounds; prints its table and returns the fastest of each run."""
    dataset, remove_th, dim = SETTINGS[label]
    dataset = dataset or args.zipf
    corpus = data.load_corpus(str(dataset), cache_dir=str(args.cache_dir), min_count=remove_th)  # built once, here
    short = args.dense_words if label == "1M" else 0
    print(f"\n### V = {len(corpus.words):,} ({dataset.name}, --remove-th {remove_th}), d={dim}: "
          f"{len(corpus):,} words" + (f"; the dense and torch-engine runs train the first {short:,}" if short else ""),
          flush=True)
    del corpus
    runs = {"1 process": (1, "-", "kernel", 0), "async dense": (2, "dense", "kernel", short),
            "async sparse": (2, "sparse", "kernel", 0)}
    references = {"async dense": "1 process", "async sparse": "1 process"}
    if args.with_sync:
        runs.update({"1 process, torch engine": (1, "-", "window", short), "sync": (2, "sync", "window", short)})
        references["sync"] = "1 process, torch engine"
    best, ratios = {}, {name: [] for name in references}
    for repeat in range(args.repeats):
        this_round = {}
        for name, (procs, mode, loop, words) in runs.items():  # each reference runs before the runs it is for
            figures = this_round[name] = run(dataset, args.cache_dir, remove_th, dim, words, procs, mode, loop)
            print(f"  round {repeat + 1}, {name}: {speed(figures):,.0f} words/s", flush=True)
            if name in references:
                ratios[name].append(speed(figures) / speed(this_round[references[name]]))
            if name not in best or speed(figures) > speed(best[name]):
                best[name] = figures
    print("\n| run | processes | words/s | vs 1 process | bytes per exchange (a rank) | rows per exchange | bytes per "
          "trained word | time per exchange: passes + waits (share of the epoch) | exchanges | peak RSS per "
          "process (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in runs:
        print(describe(f"V={label}, d={dim}, {name}", best[name], best[references.get(name, name)], dim))
    print("ratios to one process, every round (same round): "
          + "; ".join(f"{name} {', '.join(f'{r:.2f}x' for r in rs)}" for name, rs in ratios.items()))
    return {"dataset": str(dataset), "remove_th": remove_th, "dim": dim, "runs": best}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zipf", type=Path, default=None,
                   help="the synthetic corpus of bench/zipf_corpus.py for the V = 1M setting (without it: skipped)")
    p.add_argument("--settings", nargs="+", default=["21k", "60k", "1M"], choices=list(SETTINGS))
    p.add_argument("--repeats", type=int, default=2, help="rounds of the runs of each setting")
    p.add_argument("--dense-words", type=int, default=3_000_000,
                   help="words the dense and torch-engine runs train at V = 1M (a dense exchange moves the whole "
                        "tables)")
    p.add_argument("--with-sync", action="store_true",
                   help="also one process on the torch engine and 2 --sync ranks (for bench/model_machines.py)")
    p.add_argument("--json", type=Path, default=None, help="write every run's figures there (bench/model_machines.py)")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "data" / "cache", help="corpus cache of the trainer")
    args = p.parse_args()
    began = time.time()
    print(f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.2f} at the start; one thread a process, "
          "1 epoch a run")
    measured = {}
    for label in args.settings:
        if label == "1M" and args.zipf is None:
            print("\nV = 1M skipped: give --zipf (bench/zipf_corpus.py writes it)")
            continue
        measured[label] = bench_setting(label, args)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end; {time.time() - began:,.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps(measured, indent=1))


if __name__ == "__main__":
    main()
