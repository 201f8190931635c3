"""The original sgns_pytorch's experiments table on this machine: 1 process vs 2 processes (Gloo, one thread each),
sync and async, d = 50 and 200, batch 1024, 8192 (the original sgns_pytorch's) and 32768; time per epoch, words/s and
lowest PIP loss.

    NLTK_DATA=../shared/nltk_data python bench/bench_distributed.py            # 3 x 27 runs, ~10 min on 2 idle cores
    python bench/bench_distributed.py --words 0                                 # the whole Gutenberg corpus

Every run is `trainer.py` for 1 epoch. The original sgns_pytorch's table uses the torch engine (batched steps; sync
runs need it); async runs on the compiled CPU kernel (the default on a CPU) are compared with one
kernel process. 2-process runs are two `trainer.py --multi-node` processes joined over
tcp://127.0.0.1. To fit the
time, the corpus is the first Gutenberg books in alphabetical order up to --words words (default 400k; linked from a
temporary folder; nothing is copied into the repo). Figures come from rank 0's checkpoint history.
"""
import argparse
import csv
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from paths import GUTENBERG, ROOT
import distributed  # noqa: E402


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def corpus_subset(source, words, folder):
    """Links to the first books (alphabetical) holding about `words` words; the source folder when words == 0."""
    if words <= 0:
        return source, None
    manifest = {row["file"]: int(row["words_wc"]) for row in csv.DictReader(open(source / "MANIFEST.tsv"),
                                                                          delimiter="\t")}
    total, chosen = 0, []
    for book in sorted(source.glob("*.txt")):
        if total >= words:
            break
        chosen.append(book.name)
        total += manifest.get(book.name, 0)
        (folder / book.name).symlink_to(book.resolve())
    return folder, f"{len(chosen)} books, {total:,} words (wc): {', '.join(b[:-4] for b in chosen)}"


def add_corpus_arguments(parser):
    """The corpus flags of the distributed benches: which books, how many words, where the cache is."""
    parser.add_argument("--dataset", type=Path, default=GUTENBERG,
                        help="folder of Gutenberg .txt files with MANIFEST.tsv")
    parser.add_argument("--words", type=int, default=400_000,
                        help="corpus size: first books up to this many words (0: all)")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "data" / "cache", help="corpus cache of the trainer")


def swap(mine, theirs, peer):
    """Send mine to peer and receive theirs from it, the receive posted first, as a sync step swaps its rows."""
    received, sent = dist.irecv(theirs, peer), dist.isend(mine, peer)
    received.wait()
    sent.wait()


def _probe_rank(rank, init, sizes, repeats, results):
    """Seconds per exchange of each size (elements a rank) between 2 Gloo ranks, one thread each, and
    the CPU seconds of rank 0 (the CPU is what 2 ranks on 2 cores compete for): Gloo's all-gather,
    the all-reduce of --async's exchange in float32 and in bfloat16 (what it sends), then, with
    Gloo's I/O thread idle-class as in --sync runs, the send/receive pair a sync step swaps its
    float32 rows with."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)

    def measure(name, n, exchange):
        for _ in range(10):
            exchange()
        dist.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()  # CPU: all threads, Gloo's too
        for _ in range(repeats):
            exchange()
        if rank == 0:
            results[(name, n)] = ((time.perf_counter() - start) / repeats, (time.process_time() - start_cpu) / repeats)
    try:
        for n in sizes:
            mine, parts = torch.ones(n), [torch.empty(n) for _ in range(2)]
            changes = {dtype: torch.ones(n, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
            measure("all-gather", n, lambda: dist.all_gather(parts, mine))
            measure("all-reduce float32", n, lambda: dist.all_reduce(changes[torch.float32]))
            measure("all-reduce bfloat16", n, lambda: dist.all_reduce(changes[torch.bfloat16]))
        distributed.idle_gloo_io_thread()
        for n in sizes:
            mine, theirs = torch.ones(n), torch.empty(n)
            measure("send/receive", n, lambda: swap(mine, theirs, 1 - rank))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def gloo_probe(sizes=(4, 250_000, 750_000, 1_900_000), repeats=100):
    """What one exchange costs here: a sync step waits for one send/receive (its rows); an
    --async exchange at d=200 all-reduces 1.9M changes a rank (two 4,665 x 200 tables)."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_probe_rank, args=(f"tcp://127.0.0.1:{free_port()}", sizes, repeats, results),
                           nprocs=2, start_method="spawn")
        return dict(results)


def launch(common, procs, rank_flags, name, cwd=ROOT):
    """Run the command `common` once (procs == 1), or as procs --multi-node ranks joined over
    tcp://127.0.0.1 with rank_flags added; one thread each, no torchrun variables from outside.
    Exits with the ranks' output if one fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    commands = [common]
    if procs > 1:
        init = f"tcp://127.0.0.1:{free_port()}"
        commands = [common + ["--multi-node", *rank_flags, "--init-method", init, "--rank", str(r), "--world-size",
                              str(procs), "--dist-timeout", "600"] for r in range(procs)]
    running = [subprocess.Popen(c, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
               for c in commands]
    outputs = [p.communicate()[0] for p in running]
    if any(p.returncode for p in running):
        sys.exit(f"{name} failed:\n" + "\n".join(o[-2000:] for o in outputs))


def run(name, engine, procs, mode, dim, batch, args, work):
    common = [sys.executable, str(ROOT / "trainer.py"), "--dataset", str(args.dataset), "--cache-dir",
              str(args.cache_dir), "--log-dir", str(work / "runs"), "--run-name", name, "--engine", engine,
              "--epochs", "1", "--embed-size", str(dim), "--batch-size", str(batch), "--num-threads", "1",
              "--pip-vocab", str(args.pip_vocab), "--quiet", "--seed", "1", "--projector-words", "100"]
    start = time.time()
    launch(common, procs, [f"--{mode}"], name)
    ckpt = torch.load(work / "runs" / name / "checkpoint.pt", weights_only=True)
    history = {tag: values[-1][1] for tag, values in ckpt["history"].items()}
    return {"epoch_time": history["Epoch time"], "words_per_s": history["Words per second"],
            "steps": ckpt["global_step"],
            "pip": ckpt["best_oracle_pip"], "wall": time.time() - start}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_corpus_arguments(p)
    p.add_argument("--pip-vocab", type=int, default=5_000, help="most frequent words the PIP loss is computed on")
    p.add_argument("--dims", type=int, nargs="+", default=[50, 200], help="embedding sizes")
    p.add_argument("--batches", type=int, nargs="+", default=[1024, 8192, 32768],
                   help="global batch sizes (pairs): the original sgns_pytorch's 1024 and 8192, and 32768, where sync passes 1.3x here")
    p.add_argument("--repeats", type=int, default=3, help="runs of each setting; the table keeps the fastest")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-dist-") as tmp:
        work = Path(tmp)
        (work / "books").mkdir()
        args.dataset, described = corpus_subset(args.dataset, args.words, work / "books")
        print(f"corpus: {described or args.dataset}; 1 epoch per run, one thread per process, "
              f"{os.cpu_count()} CPU cores, PIP loss (oracle) on the {args.pip_vocab} most frequent words")
        settings = [("torch", dim, batch, procs, mode) for dim in args.dims for batch in args.batches
                    for procs, mode in ((1, "-"), (2, "sync"), (2, "async"))]
        # the kernel steps pair by pair: one process does not depend on the batch; async ranks
        # average after the centers of --sync-interval batches
        settings += [("kernel", dim, batch, procs, mode) for dim in args.dims
                     for batch, procs, mode in [(args.batches[0], 1, "-")] + [(b, 2, "async") for b in args.batches]]
        best = {}
        # Rounds over all settings, each setting's fastest epoch kept: a slow spell of this shared
        # box (single runs vary by up to 30%) then hits every setting instead of a few.
        for repeat in range(args.repeats):
            for engine, dim, batch, procs, mode in settings:
                name = f"{engine}-d{dim}-b{batch}-p{procs}-{mode}"
                result = run(f"{name}-r{repeat}", engine, procs, mode, dim, batch, args, work)
                print(f"  {name} (round {repeat + 1}): {result['epoch_time']:.1f} s/epoch, "
                      f"{result['words_per_s']:,.0f} words/s, PIP {result['pip']:.4g} (wall {result['wall']:.0f} s)",
                      flush=True)
                if name not in best or result["epoch_time"] < best[name]["epoch_time"]:
                    best[name] = {"engine": engine, "dim": dim, "batch": batch, "procs": procs, "mode": mode,
                                  **result}
        rows = list(best.values())
    probe = gloo_probe()
    for name in ("all-gather", "send/receive", "all-reduce float32", "all-reduce bfloat16"):
        width = 2 if name.endswith("bfloat16") else 4
        print(f"\nGloo {name} between 2 processes here (one thread each): "
              + ", ".join(f"{n:,} elements ({n * width / 1e6:g} MB) a rank {t * 1e3:.2f} ms (CPU {cpu * 1e3:.2f} ms)"
                          for (kind, n), (t, cpu) in sorted(probe.items()) if kind == name))
    latency = min(t for (kind, _), (t, _) in probe.items() if kind == "send/receive")
    print("\n| model | engine | nodes (processes) | sync | embedding | batch | time/epoch (s) | words/s | "
          "lowest PIP loss |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        batch = "-" if (r["engine"], r["procs"]) == ("kernel", 1) else r["batch"]
        print(f"| sgns | {r['engine']} | {r['procs']} | {r['mode']} | {r['dim']} | {batch} | {r['epoch_time']:.1f} | "
              f"{r['words_per_s']:,.0f} | {r['pip']:.4g} |")

    def find(engine, dim, batch, mode):
        return next(r for r in rows if (r["engine"], r["dim"], r["mode"]) == (engine, dim, mode)
                    and (r["batch"] == batch or mode == "-" and engine == "kernel"))
    print("\n| embedding | batch | async / 1 process | sync / 1 process | async kernel / 1 kernel process | "
          "PIP async / 1 process | PIP sync / 1 process | PIP async kernel / 1 kernel process | "
          "1-process step (ms) | sync step (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dim in args.dims:
        for batch in args.batches:
            one, sync, asy, one_k, asy_k = (find(e, dim, batch, m) for e, m in (
                ("torch", "-"), ("torch", "sync"), ("torch", "async"), ("kernel", "-"), ("kernel", "async")))
            print(f"| {dim} | {batch} | {asy['words_per_s'] / one['words_per_s']:.2f}x | "
                  f"{sync['words_per_s'] / one['words_per_s']:.2f}x | "
                  f"{asy_k['words_per_s'] / one_k['words_per_s']:.2f}x | {asy['pip'] / one['pip']:.3f} | "
                  f"{sync['pip'] / one['pip']:.3f} | {asy_k['pip'] / one_k['pip']:.3f} | "
                  f"{one['epoch_time'] / one['steps'] * 1e3:.2f} | {sync['epoch_time'] / sync['steps'] * 1e3:.2f} |")
    print("words/s ratios; targets: async >= 1.6x, sync >= 1.3x, final PIP loss within 10% (ratio <= 1.10)")
    print(f"a sync step waits for at least one exchange after its gradients (its rows, their count in the first "
          f"row): at least {latency * 1e3:.2f} ms a step here, whatever the batch; 1.3x needs "
          f"a sync step at most 1/1.3 of the 1-process step")

if __name__ == "__main__":
    main()
