"""Where a --sync step's time goes on this machine: its parts, timed inside 2 Gloo ranks (one thread
each) on real windows of the corpus bench_distributed.py uses, against one process's step.

    NLTK_DATA=../shared/nltk_data python bench/bench_sync_step.py      # about 25 s on 2 idle cores

For each embedding size and global batch: one process's whole step (alone on the machine, before
the ranks start), then in 2 ranks a rank's half of it (the compiled window step on its own windows, both
ranks at once, as in a sync run), the sync step itself (distributed.sync_window_step) and Gloo's
round trip for a few bytes. A sync step cannot take less than a half step plus that round trip:
the script prints the words/s ratio to one process that bound allows, next to the 1.3x target. An
--async rank on the torch engine makes the same half steps and exchanges between them: one
process's step over a half step bounds its ratio (1.6x asked) as if exchanges were free. Last,
the same bound for --async on the compiled kernel (the CPU's default engine): one process's epoch
against two processes training their halves at once, with no exchange.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import cpu_kernel  # noqa: E402
import data  # noqa: E402
import distributed  # noqa: E402
import engines  # noqa: E402
import model as models  # noqa: E402
from bench_distributed import add_corpus_arguments, corpus_subset, free_port, swap  # noqa: E402

WINDOW, NEGATIVES, LR = 5, 5, 0.025
CENTERS_PER_STEP = engines.centers_per_step(4096, WINDOW)  # the kernel's steps: the trainer's default batch


def mean_ms(run, steps):
    """Mean ms of run(i) over steps calls, after 20 unmeasured ones."""
    for i in range(20):
        run(i)
    start = time.perf_counter()
    for i in range(steps):
        run(i)
    return (time.perf_counter() - start) / steps * 1e3


def step_windows(corpus, batch, steps):
    """Windows for steps global batches of consecutive centers, in a list per step: (one process's
    whole step, rank 0's half, rank 1's half); step i of one process covers step i of both ranks."""
    sampler = data.NegativeSampler(corpus.counts)
    windows = data.WindowBatches(corpus, data.keep_probabilities(corpus.counts, 1e-3), sampler, WINDOW, NEGATIVES,
                                 "cpu")
    kept_ids, kept_sentence = windows.subsample(1, 0)
    half = batch // 2 // (WINDOW + 1)  # centers in a rank's step (engines.centers_per_step)
    draw = windows.windows(kept_ids, kept_sentence, 0, 2 * half * steps, windows.seeded(1, 0))
    return [[[t[lo:lo + n] for t in draw] for lo, n in ((2 * half * i, 2 * half), (2 * half * i, half),
                                                         ((2 * i + 1) * half, half))] for i in range(steps)]


def new_model(corpus, dim):
    torch.manual_seed(1)
    return models.SGNS(len(corpus.words), dim)


def one_process(corpus, dims, batches, steps):
    """One process's whole step, alone on the machine (before the ranks start)."""
    torch.set_num_threads(1)
    cpu_kernel.warm_up_rows()
    times = {}
    for dim in dims:
        for batch in batches:
            model, steps_windows = new_model(corpus, dim), step_windows(corpus, batch, steps)
            times[(dim, batch)] = mean_ms(lambda i: engines.compiled_window_step(model, *steps_windows[i][0], LR), steps)
    return times


def kernel_seconds(corpus, dim, part, parts, start=None):
    """Seconds the compiled kernel (one thread) takes to train part of parts of an epoch's text
    (data.epoch_share's cut), from a fresh model; start: a barrier passed just before the clock."""
    torch.set_num_threads(1)
    sampler = data.NegativeSampler(corpus.counts)
    kept_ids, starts = data.subsample(corpus.token_ids, corpus.sentence_starts,
                                      data.keep_probabilities(corpus.counts, 1e-3), data.epoch_rng(1, 0))
    ids, local_starts = data.epoch_share(kept_ids, starts, 1, 0, part, parts, shuffled=True)
    model = new_model(corpus, dim)
    tables = model.in_embed.weight.data.numpy(), model.out_embed.weight.data.numpy()
    cpu_kernel.set_threads(1)
    cpu_kernel.warm_up(*tables, sampler, WINDOW, NEGATIVES)
    steps = np.append(np.arange(0, len(ids), CENTERS_PER_STEP), len(ids))
    if start is not None:
        start.wait()
    began = time.perf_counter()
    cpu_kernel.train(*tables, ids, np.append(local_starts, len(ids)), steps, 0, data.step_seed(1, 0, part),
                     np.linspace(LR, LR / 100, len(steps)), WINDOW, NEGATIVES, sampler)
    return time.perf_counter() - began


def _kernel_half(part, corpus, dim, start, results):
    results[part] = kernel_seconds(corpus, dim, part, 2, start)


def kernel_ceiling(corpus, dim):
    """One process's epoch on the kernel over two processes' halves trained at once, with no
    exchange at all: what 2 --async ranks could reach on this machine if exchanges were free."""
    one = kernel_seconds(corpus, dim, 0, 1)
    with mp.Manager() as manager:
        halves, start = manager.dict(), manager.Barrier(2)
        mp.start_processes(_kernel_half, args=(corpus, dim, start, halves), nprocs=2, start_method="spawn")
        return one, max(halves.values())


def rank_main(rank, init, corpus, dims, batches, steps, results):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    distributed.idle_gloo_io_thread()  # as trainer.py's --sync runs do
    cpu_kernel.warm_up_rows()
    try:
        for dim in dims:
            for batch in batches:
                model, steps_windows = new_model(corpus, dim), step_windows(corpus, batch, steps)
                mine = [step[1 + rank] for step in steps_windows]
                half = len(mine[0][0])
                dist.barrier()
                halves = mean_ms(lambda i: engines.compiled_window_step(model, *mine[i], LR), steps)
                dist.barrier()
                sync = mean_ms(lambda i: distributed.sync_window_step(model, *mine[i], LR, half), steps)
                dist.barrier()
                mine_few, theirs_few = torch.ones(4), torch.empty(4)  # a round trip of a few floats
                trip = mean_ms(lambda i: swap(mine_few, theirs_few, 1 - rank), steps)
                if rank == 0:
                    results[(dim, batch)] = (halves, sync, trip)
    finally:
        dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_arguments(p)
    p.add_argument("--dims", type=int, nargs="+", default=[50, 200], help="embedding sizes")
    p.add_argument("--batches", type=int, nargs="+", default=[1024, 8192], help="global batch sizes (pairs)")
    p.add_argument("--steps", type=int, default=200, help="steps timed for each part")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as tmp:
        (Path(tmp) / "books").mkdir()
        source, described = corpus_subset(args.dataset, args.words, Path(tmp) / "books")
        corpus = data.load_corpus(source, cache_dir=args.cache_dir)
    print(f"corpus: {described or source}; V = {len(corpus.words):,}; window {WINDOW}, {NEGATIVES} negatives; "
          f"2 Gloo ranks on 127.0.0.1, one thread each")
    one = one_process(corpus, args.dims, args.batches, args.steps)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(rank_main, args=(f"tcp://127.0.0.1:{free_port()}", corpus, args.dims, args.batches,
                                            args.steps, results), nprocs=2, start_method="spawn")
        results = dict(results)
    print("\n| embedding | batch | one process's step (ms) | a rank's half step, both at once (ms) | sync step (ms) "
          "| round trip (ms) | sync / one process | half step + round trip (ms) | best sync / one process "
          "| best async / one process |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (dim, batch), (halves, sync, trip) in sorted(results.items()):
        whole = one[dim, batch]
        print(f"| {dim} | {batch} | {whole:.3f} | {halves:.3f} | {sync:.3f} | {trip:.3f} | {whole / sync:.2f}x "
              f"| {halves + trip:.3f} | {whole / (halves + trip):.2f}x | {whole / halves:.2f}x |")
    print("words/s ratios (both ranks' windows a step against one process's, the same text); targets: sync 1.3x, "
          "async 1.6x")
    print("\n| embedding | one process's epoch on the kernel (s) | 2 processes' halves at once, no exchange (s) "
          "| ceiling of --async on the kernel / one process |")
    print("|---|---|---|---|")
    for dim in args.dims:
        one_epoch, halves = kernel_ceiling(corpus, dim)
        print(f"| {dim} | {one_epoch:.3f} | {halves:.3f} | {one_epoch / halves:.2f}x |")


if __name__ == "__main__":
    main()
