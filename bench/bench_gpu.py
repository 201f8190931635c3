"""GPU bench: sgns training throughput on one GPU, with the vectors' quality, in one run.

    python bench/bench_gpu.py [--dataset ../shared/corpora/gutenberg] [--seed-dataset FOLDER]
                              [--eval-dir ../shared/eval] [--only NAME,NAME]

Each setting is a whole `trainer.py` run (PIP loss off), its figures read from the run's
checkpoint: seconds per epoch and corpus words/s (the first epoch apart: it holds CUDA's
start-up and the graph capture), then WS353, SimLex-999 and analogy accuracy of the vectors.

1. the shared corpus, d=200, 10 negatives, batch 8192: Triton steps replayed a draw at a time
   from a CUDA graph (the default), the same step as tensor ops (--no-gpu-kernel), eager steps
   (--no-cuda-graph), and the autograd path whose batches are built on the host
   (--optimizer sparse_adam), for what building batches on the GPU buys;
2. the same with larger batches, to see where the GPU itself, not the launch rate, limits;
3. the original sgns_pytorch's setting: a corpus of about 1M tokens (Harry-Potter-sized; --seed-dataset),
   d=200, batch 8192, as seconds per epoch beside the original sgns_pytorch's 28.6 s on a GTX 1080.
"""
import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from paths import EVAL, GUTENBERG, ROOT
import evaluate  # noqa: E402

SEED_REPORTED_EPOCH_S = 28.6  # the original sgns_pytorch's README: SGNS, d=200, batch 8192, one GTX 1080


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default=str(GUTENBERG),
                   help="the shared corpus (about 3M tokens)")
    p.add_argument("--seed-dataset", default=None,
                   help="a corpus of about 1M tokens for the original sgns_pytorch's setting (default: skip that setting)")
    p.add_argument("--eval-dir", default=str(EVAL),
                   help="folder with wordsim353.tsv, simlex999.tsv and questions-words.txt")
    p.add_argument("--epochs", type=int, default=5, help="epochs of each full run")
    p.add_argument("--device", default="cuda", help="torch device")
    p.add_argument("--timeout", type=float, default=240, help="seconds before a setting is abandoned")
    p.add_argument("--only", default=None, help="comma-separated names of the settings to run (default: all)")
    return p.parse_args()


def run_setting(name, dataset, flags, args, workdir):
    """One trainer run; returns its figures, or None (with the reason printed) if it failed."""
    cmd = [sys.executable, str(ROOT / "trainer.py"), "--dataset", dataset, "--device", args.device,
           "--pip-interval", "0", "--quiet", "--log-dir", str(workdir), "--run-name", name,
           "--cache-dir", str(ROOT / "data" / "cache"), *flags]
    start = time.perf_counter()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"{name}: abandoned after {args.timeout:.0f} s")
        return None
    wall = time.perf_counter() - start
    if result.returncode != 0:
        print(f"{name}: exit {result.returncode}: {(result.stderr or result.stdout).strip()[-2000:]}")
        return None
    ckpt = torch.load(workdir / name / "checkpoint.pt", weights_only=True, map_location="cpu")
    epoch_s = [value for _, value in ckpt["history"]["Epoch time"]]
    words_s = [value for _, value in ckpt["history"]["Words per second"]]
    later_s, later_words_s = (epoch_s[1:], words_s[1:]) if len(epoch_s) > 1 else (epoch_s, words_s)
    figures = {"wall": wall, "first_epoch_s": epoch_s[0], "first_words_s": words_s[0],
               "epoch_s": float(np.mean(later_s)), "epoch_range": (min(later_s), max(later_s)),
               "words_s": float(np.dot(later_s, later_words_s) / np.sum(later_s))}  # all their words / all their time
    words, vectors = ckpt["words"], ckpt["model"]["in_embed.weight"].numpy()
    eval_dir = Path(args.eval_dir)
    for label, file in (("ws353", "wordsim353.tsv"), ("simlex", "simlex999.tsv")):
        figures[label] = evaluate.similarity(words, vectors, evaluate.load_pairs(eval_dir / file))["spearman"]
    figures["analogy"] = evaluate.analogy(words, vectors, eval_dir / "questions-words.txt")["accuracy"]
    return figures


def main():
    args = parse_args()
    print(f"device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'}; "
          f"torch {torch.__version__}")
    common = ["--embed-size", "200", "--neg-sample-size", "10"]
    settings = [
        ("graph-b8192", args.dataset, [*common, "--batch-size", "8192", "--epochs", str(args.epochs)]),
        ("tensor-ops-b8192", args.dataset, [*common, "--batch-size", "8192", "--epochs", str(args.epochs),
                                            "--no-gpu-kernel"]),
        ("eager-b8192", args.dataset, [*common, "--batch-size", "8192", "--epochs", str(args.epochs),
                                       "--no-cuda-graph"]),
        ("host-batches-sparse-adam-b8192", args.dataset, [*common, "--batch-size", "8192", "--epochs", "1",
                                                          "--optimizer", "sparse_adam"]),
        ("graph-b32768", args.dataset, [*common, "--batch-size", "32768", "--epochs", str(args.epochs)]),
        ("graph-b131072", args.dataset, [*common, "--batch-size", "131072", "--epochs", str(args.epochs)]),
    ]
    if args.seed_dataset:
        settings.append(("seed-setting-b8192", args.seed_dataset, ["--embed-size", "200", "--batch-size", "8192",
                                                                   "--epochs", str(args.epochs)]))
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {name for name, _, _ in settings}
        if unknown:
            sys.exit(f"--only: no setting named {', '.join(sorted(unknown))} "
                     f"(settings: {', '.join(name for name, _, _ in settings)})")
        settings = [setting for setting in settings if setting[0] in wanted]
    header = (f"{'setting':32} {'epoch 1 s':>9} {'epoch s':>8} {'range s':>11} {'words/s':>11} {'whole run s':>11} "
              f"{'WS353':>6} {'SimLex':>6} {'analogy':>7}")
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, dataset, flags in settings:
            figures = run_setting(name, dataset, flags, args, Path(workdir))
            if figures:
                low, high = figures["epoch_range"]
                rows.append(f"{name:32} {figures['first_epoch_s']:9.2f} {figures['epoch_s']:8.2f} "
                            f"{low:5.2f}-{high:5.2f} "
                            f"{figures['words_s']:11,.0f} {figures['wall']:11.1f} {figures['ws353']:6.3f} "
                            f"{figures['simlex']:6.3f} {figures['analogy']:7.1%}")
                print(rows[-1], flush=True)
                if name.startswith("seed-setting"):
                    rows.append(f"  original sgns_pytorch's setting: {figures['epoch_s']:.2f} s/epoch here against the original sgns_pytorch's "
                                f"{SEED_REPORTED_EPOCH_S} s on a GTX 1080 ({SEED_REPORTED_EPOCH_S / figures['epoch_s']:.0f}x)")
    print("\n" + header)
    print("\n".join(rows))
    print("(epoch s: mean over epochs 2 on, and its range; words/s: their words over their time, counting corpus "
          "tokens; target >= 10M on one H100)")


if __name__ == "__main__":
    main()
