"""What --async costs in quality: one process against --async ranks (default 2 and 4), same corpus and epochs.

    NLTK_DATA=../shared/nltk_data python bench/bench_async_quality.py               # ~4 min on 2 idle cores
    python bench/bench_async_quality.py --trainer ../old-checkout/trainer.py        # another version's trainer
    python bench/bench_async_quality.py --ranks 2 --exchanges dense sparse --remove-th 1   # the two exchanges, V = 60k

Every run is `trainer.py` on the whole shared Gutenberg corpus (d=100, 3 epochs, the trainer's batch,
--sync-interval and --block-momentum unless told, one thread per process, the default engine:
the compiled kernel), the ranks joined over Gloo on 127.0.0.1. For each: words/s of the last
epoch, and WordSim353, SimLex-999, MEN and Google analogy scores of the final vectors. Runs of
more ranks than cores time-share the cores: their words/s says nothing about speed, only their
quality counts.
"""
import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

from bench_distributed import launch
from bench_speed import quality

from paths import GUTENBERG, ROOT
import evaluate  # noqa: E402


def train(trainer, ranks, exchange, args, run_dir):
    """trainer.py with `ranks` processes (1: no --multi-node; exchange: --async-exchange); returns the
    run's last epoch words/s."""
    common = [sys.executable, str(trainer), "--dataset", str(args.dataset), "--cache-dir", str(args.cache_dir),
              "--log-dir", str(run_dir.parent), "--run-name", run_dir.name, "--epochs", str(args.epochs),
              "--embed-size", str(args.dim), "--num-threads", "1", "--pip-interval", "0", "--quiet",
              "--seed", "1", "--projector-words", "100", "--remove-th", str(args.remove_th)]
    if args.batch_size:
        common += ["--batch-size", str(args.batch_size)]
    rank_flags = ["--async"]
    if args.sync_interval:
        rank_flags += ["--sync-interval", str(args.sync_interval)]
    if args.block_momentum:  # a flag older trainers lack
        rank_flags += ["--block-momentum", str(args.block_momentum)]
    if exchange != "auto":
        rank_flags += ["--async-exchange", exchange]
    launch(common, ranks, rank_flags, run_dir.name, cwd=trainer.parent)
    history = torch.load(run_dir / "checkpoint.pt", weights_only=True)["history"]
    return history["Words per second"][-1][1]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", type=Path, default=GUTENBERG,
                   help="corpus folder or file")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "data" / "cache", help="corpus cache of the trainer")
    p.add_argument("--trainer", type=Path, default=ROOT / "trainer.py", help="the trainer.py to measure")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="process counts (1: one plain process)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of every run")
    p.add_argument("--dim", type=int, default=100, help="embedding size")
    p.add_argument("--batch-size", type=int, default=None,
                   help="--batch-size of every run (default: the trainer's; the kernel trains pair by pair, so the "
                        "batch only sets when async ranks average)")
    p.add_argument("--sync-interval", type=int, default=None,
                   help="--sync-interval of the async runs (default: the trainer's)")
    p.add_argument("--block-momentum", type=float, default=0.0, help="--block-momentum of the async runs")
    p.add_argument("--exchanges", nargs="+", default=["auto"], choices=["auto", "dense", "sparse"],
                   help="--async-exchange of the async runs: each one runs (a flag older trainers lack)")
    p.add_argument("--remove-th", type=int, default=5, help="--remove-th (min count) of every run")
    args = p.parse_args()
    trainer = args.trainer.resolve()
    print(f"{trainer}; corpus {args.dataset}; d={args.dim}, {args.epochs} epochs, one thread per process, "
          f"--batch-size {args.batch_size or 'default'}, --sync-interval {args.sync_interval or 'default'}, "
          f"--block-momentum {args.block_momentum}, --remove-th {args.remove_th}, {os.cpu_count()} CPU cores")
    print("\n| processes | words/s (last epoch) | WS353 | SimLex | MEN | analogy |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="bench-async-") as tmp:
        runs = [(ranks, exchange) for ranks in args.ranks for exchange in (["auto"] if ranks == 1 else args.exchanges)]
        for ranks, exchange in runs:
            run_dir = Path(tmp) / f"ranks{ranks}-{exchange}"
            words_per_s = train(trainer, ranks, exchange, args, run_dir)
            words, vectors, _, _ = evaluate.load_checkpoint(run_dir)
            scores = quality(words, vectors)
            label = "1" if ranks == 1 else f"{ranks} async" + ("" if exchange == "auto" else f", {exchange}")
            print(f"| {label} | {words_per_s:,.0f} | {scores['WS353']:.3f} | {scores['SimLex']:.3f} | "
                  f"{scores['MEN']:.3f} | {scores['analogy']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
