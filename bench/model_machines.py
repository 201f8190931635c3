"""A model of N machines, one rank each, from the parts bench_async_exchange.py measures: words/s of --sync and --async.

    python bench/bench_async_exchange.py --with-sync --zipf /tmp/zipf-1m.txt --json /tmp/parts.json
    python bench/model_machines.py /tmp/parts.json                              # a few seconds

The parts, per setting (V, d): one process's words/s on the compiled kernel (what an --async
rank trains at) and on the torch engine (what a --sync rank steps with), the seconds an async
rank spends in its own exchange passes per exchange, and the rows an exchange or a sync step
carries, measured on 2 ranks and scaled to N ranks by the expected number of distinct rows a
stretch of text touches (expected_rows: contexts and centers drawn from the subsampled unigram
distribution, negatives from unigram^0.75, as if independent), calibrated on the 2-rank count.

--async, N ranks: an interval is n centers of the whole corpus (the default, --batch-size 4096 and
50 steps: 34,133, whatever N), n/N a rank. A rank trains them at the kernel's speed and makes its
passes; the all-reduces of the union's bits and rows (bfloat16, 2d + 2 bytes a row) run behind
training, a ring moving 2 (N-1)/N of the buffer a rank, one message latency a hop:
    interval = max(n/N words / speed + passes, ring time)
Rows and passes grow with the union of the interval's rows, here the same for every N. The
second table keeps each rank's share of an interval at the 2-rank default (--batch-size 2048 N).
--sync, N ranks: a step of the global batch, each rank's share at the torch engine's speed
(a fixed cost of FIXED_STEP_S a step, the rest split), then each rank sends its rows ((d + 3)
float32 each) to each other rank over its link, one latency; all ranks apply all rows.
Speeds and passes are taken in CPU seconds (a core of one's own, whatever else ran on this shared
box). The check compares the model of this box (2 ranks on 2 cores: training, passes and Gloo's
CPU one after another on each core) with the 2-rank measurement, per CPU second of its busier
rank (what it reaches on two cores of its own) and by the clock (which also pays for the box's
other load, the hypervisor's steal included).
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402

LINKS_GBIT = (1, 10, 25, 100)
MACHINES = (2, 4, 8, 16, 32, 64)
LATENCY_S = 50e-6  # one message between two machines of a LAN
FIXED_STEP_S = 0.15e-3  # a torch-engine step's cost that does not shrink with its batch (bench/RESULTS.md)
BATCH, WINDOW, NEGATIVE, STEPS_PER_EXCHANGE = 4096, 5, 5, 50


def expected_rows(corpus, centers):
    """Expected distinct (in_embed, out_embed) rows that `centers` kept centers touch: their contexts'
    input rows, and their own and their negatives' output rows."""
    keep = data.keep_probabilities(corpus.counts, 1e-3)
    kept = corpus.counts * keep / (corpus.counts * keep).sum()
    noise = corpus.counts ** 0.75 / (corpus.counts ** 0.75).sum()
    missed_by_text = centers * np.log1p(-kept)
    in_rows = -np.expm1(missed_by_text).sum()
    out_rows = -np.expm1(missed_by_text + centers * NEGATIVE * np.log1p(-noise)).sum()
    return in_rows + out_rows


def kept_share(corpus):
    keep = data.keep_probabilities(corpus.counts, 1e-3)
    return float((corpus.counts * keep).sum() / corpus.counts.sum())


def ring_seconds(n_machines, size, gbit):
    """A ring all-reduce of size bytes: 2 (N-1)/N of it through each link, 2 (N-1) latencies."""
    return 2 * (n_machines - 1) / n_machines * size * 8 / (gbit * 1e9) + 2 * (n_machines - 1) * LATENCY_S


class Parts:
    """One setting's measured parts, and the model's words/s for N machines."""

    def __init__(self, setting):
        runs, self.dim = setting["runs"], setting["dim"]
        self.corpus = data.load_corpus(setting["dataset"], cache_dir=setting["cache_dir"],
                                       min_count=setting["remove_th"])
        self.vocab, self.kept = len(self.corpus.words), kept_share(self.corpus)
        self.runs = runs
        self.kernel_speed = _cpu_speed(runs["1 process"])
        self.sparse = runs["async sparse"][0]
        exchanges = self.sparse["exchanges"]
        self.pass_s = self.sparse["exchange_cpu_s"] / exchanges
        self.gloo_s = (self.sparse["cpu_seconds"] - self.sparse["thread_cpu_seconds"]) / exchanges
        self.interval_centers = STEPS_PER_EXCHANGE * BATCH // (WINDOW + 1)
        self.union_scale = self.sparse["rows"] / exchanges / expected_rows(self.corpus, self.interval_centers)
        self.torch_speed = _cpu_speed(runs["1 process, torch engine"]) if "sync" in runs else None
        if self.torch_speed:
            sync = runs["sync"][0]
            self.step_centers = BATCH // (WINDOW + 1)
            self.step_scale = sync["step_rows"] / sync["steps"] / expected_rows(self.corpus, self.step_centers / 2)

    def this_box(self):
        """2 --async ranks here, each on a core of its own shared with its Gloo threads: the
        interval is its training, its passes and its share of the all-reduces' CPU, one after another."""
        words = self.interval_centers / self.kept
        return words / (words / 2 / self.kernel_speed + self.pass_s + self.gloo_s)

    def async_words_per_s(self, n_machines, gbit, interval_centers):
        union = self.union_scale * expected_rows(self.corpus, interval_centers)
        size = union * (2 * self.dim + 2) + 2 * math.ceil(self.vocab / 8)
        passes = self.pass_s * union / (self.sparse["rows"] / self.sparse["exchanges"])
        compute = interval_centers / self.kept / n_machines / self.kernel_speed + passes
        return interval_centers / self.kept / max(compute, ring_seconds(n_machines, size, gbit))

    def sync_words_per_s(self, n_machines, gbit):
        step_words = self.step_centers / self.kept
        one_step = step_words / self.torch_speed
        compute = FIXED_STEP_S + max(one_step - FIXED_STEP_S, 0) / n_machines
        rows = self.step_scale * expected_rows(self.corpus, self.step_centers / n_machines)
        sent = (n_machines - 1) * rows * (self.dim + 3) * 4
        return step_words / (compute + sent * 8 / (gbit * 1e9) + LATENCY_S)


def _speed(figures):
    return figures[0]["words"] / max(f["seconds"] for f in figures)


def _cpu_speed(figures):
    """Words per CPU second of one process: its speed on a core of its own, whatever else ran."""
    return figures[0]["words"] / figures[0]["cpu_seconds"]


def table(title, rows_of):
    print(f"\n{title}\n")
    print("| setting | link (Gbit/s) | " + " | ".join(f"{n} machines" for n in MACHINES) + " |")
    print("|---|---|" + "---|" * len(MACHINES))
    for label, gbit, values in rows_of:
        print(f"| {label} | {gbit} | " + " | ".join(f"{v / 1e6:.2f}M" for v in values) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", type=Path, help="the --json of bench/bench_async_exchange.py (with --with-sync)")
    p.add_argument("--cache-dir", type=Path, default=ROOT / "data" / "cache", help="corpus cache of the trainer")
    args = p.parse_args()
    settings = json.loads(args.parts.read_text())
    parts = {}
    for label, setting in settings.items():
        parts[label] = Parts({**setting, "cache_dir": str(args.cache_dir)})
        part = parts[label]
        print(f"V={label} (V = {part.vocab:,}), d={part.dim}: kernel {part.kernel_speed:,.0f} words per CPU second; "
              f"an exchange: passes {part.pass_s * 1e3:.1f} ms, Gloo {part.gloo_s * 1e3:.1f} ms of CPU, "
              f"{part.sparse['rows'] / part.sparse['exchanges']:,.0f} rows (measured / expected "
              f"{part.union_scale:.2f})" + (f"; torch engine {part.torch_speed:,.0f} words per CPU second, "
                                             f"step rows measured / expected {part.step_scale:.2f}"
                                             if part.torch_speed else ""))
        sparse, one = part.runs["async sparse"], part.runs["1 process"]
        by_cpu = sparse[0]["words"] / max(f["cpu_seconds"] for f in sparse)
        print(f"  check, 2 async ranks on this box: model {part.this_box():,.0f} words/s "
              f"({part.this_box() / part.kernel_speed:.2f}x one process); measured per CPU second of the busier "
              f"rank {by_cpu:,.0f} ({by_cpu / part.kernel_speed:.2f}x), by the clock {_speed(sparse):,.0f} "
              f"({_speed(sparse) / _speed(one):.2f}x)")
    rows = lambda fn: [(f"V={label}, d={p.dim}", gbit, [fn(p, n, gbit) for n in MACHINES])  # noqa: E731
                       for label, p in parts.items() for gbit in LINKS_GBIT]
    table("--async, default interval (every 34,133 centers of the corpus): predicted words/s",
          rows(lambda p, n, g: p.async_words_per_s(n, g, p.interval_centers)))
    table("--async, each rank's interval kept at the 2-rank default (--batch-size 2048 x N): predicted words/s",
          rows(lambda p, n, g: p.async_words_per_s(n, g, p.interval_centers * n / 2)))
    if all(p.torch_speed for p in parts.values()):
        table("--sync (torch engine): predicted words/s", rows(lambda p, n, g: p.sync_words_per_s(n, g)))


if __name__ == "__main__":
    main()
