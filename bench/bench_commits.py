"""Wall time of the same trainer command at two commits, alternating: did a change slow a run?

    python bench/bench_commits.py BEFORE AFTER [--repeats 3] [-- trainer.py flags]
    python bench/bench_commits.py bf17f1a^1 734a56a --repeats 3            # a default run

Checks each commit out into a temporary git worktree, runs the command once in each to build the
corpus cache and numba's compiled cache (not timed), then times it BEFORE, AFTER, AFTER, BEFORE,
... (--repeats rounds of each), each run its own process from start to exit. Prints every time,
the median and range per commit, and AFTER's median over BEFORE's. NLTK_DATA defaults to
../shared/nltk_data, as the tests read it.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def checkout(rev, folder):
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(folder), rev], check=True)


def run_trainer(tree, flags, log_dir):
    """Seconds from start to exit of `python trainer.py flags` in tree; exits on a failed run."""
    env = {**os.environ, "NLTK_DATA": os.environ.get("NLTK_DATA", str(ROOT.parent / "shared" / "nltk_data"))}
    began = time.perf_counter()
    result = subprocess.run([sys.executable, "trainer.py", *flags, "--log-dir", str(log_dir)], cwd=tree, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - began
    if result.returncode != 0:
        sys.exit(f"error: trainer.py in {tree} exited {result.returncode}: {result.stderr.strip()[-300:]}")
    return seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", help="the earlier commit (any git revision)")
    parser.add_argument("after", help="the later commit")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs at each commit")
    parser.epilog = "Flags after -- go to trainer.py (default: none)."
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    args, flags = parser.parse_args(argv[:split]), argv[split + 1:]
    with tempfile.TemporaryDirectory(prefix="bench-commits-") as tmp:
        trees = {name: Path(tmp) / name for name in ("before", "after")}
        try:
            for name, tree in trees.items():
                checkout(getattr(args, name), tree)
                run_trainer(tree, flags, Path(tmp) / "runs")  # caches, compiled code
            times = {"before": [], "after": []}
            order = ["before", "after", "after", "before"] * ((args.repeats + 1) // 2)
            for name in order[:2 * args.repeats]:
                times[name].append(run_trainer(trees[name], flags, Path(tmp) / "runs"))
                print(f"{name:6} {getattr(args, name):>12}: {times[name][-1]:.2f} s", flush=True)
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)],
                               stderr=subprocess.DEVNULL)
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name}: median {medians[name]:.2f} s [{min(values):.2f}-{max(values):.2f}]")
    print(f"after / before: {medians['after'] / medians['before']:.3f}x the time")


if __name__ == "__main__":
    main()
