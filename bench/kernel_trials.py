"""Trial harness for issue 24: what makes pWord2Vec's vectors better, and where our run spends its time.

    python bench/kernel_trials.py quality --variants baseline hogbatch --settings 100:5 200:10 --seeds 1 2 3
    python bench/kernel_trials.py speed --dims 50 100 200 300 --rounds 5
    python bench/kernel_trials.py --threads 2 phases --dim 200 --negative 10
    python bench/kernel_trials.py export
    python bench/kernel_trials.py widths --settings 100:5 300:10 --tokens 400000

`quality` trains on the shared corpus as `trainer.py --engine kernel` did before the HogBatch
kernel (same initialisation, subsampling, learning-rate schedule, chunks and seeds; the `baseline`
variant gives that trainer's vectors bit for bit with one thread) with one switch of the loop
changed per variant, and prints
WS353 / SimLex / MEN / Rare Words rho and analogy accuracy, one JSON line per run.

`speed` times, in one process and alternating, the per-pair loop against window-batched updates
(numba loops, and numba's BLAS sgemm) on the same subsampled slice of the corpus, one thread.

`phases` runs trainer.py and prints the wall and CPU time at each landmark from process start to
exit; `export` times writing the vectors (gensim's writer against export.py's, and the projector snapshot).
`widths` times the trainer's kernel (one thread, CPU seconds, best of 3) on a slice of the corpus
with LLVM's 512-bit and 256-bit vectors (each in its own process, numba's cache in a temporary
folder), and pWord2Vec_blas, one thread, on the same slice as text, in the same run.

The loops here are bench-only copies of the per-pair kernel the trainer ran before it took the
HogBatch window step (`baseline`: that kernel, bit for bit with one thread), with switches; the
trainer never imports this file.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from numba import njit, prange

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import cpu_kernel  # noqa: E402
import data  # noqa: E402
from bench_peers import parse_setting  # noqa: E402
from bench_speed import quality  # noqa: E402
from cpu_kernel import (_add_rows, _alias_draw, _contexts, _input_steps, _lcg, _output_steps, _scores,  # noqa: E402
                        _uniform)
from model import build_model  # noqa: E402

# switches[i] of trial_chunks
HOGBATCH = 0       # a window's gradients all from the vectors before the window, then applied (Ji et al.)
KEEP_CENTER = 1    # a negative equal to the center stays (as a label-0 output) instead of being skipped
DEDUPE = 2         # a negative drawn twice is used once
SIGMOID_TABLE = 3  # word2vec's sigmoid: 1000-entry table on [-6, 6], saturated outside
FLIP = 4           # the center's input row against each context's output row (and the negatives)
N_SWITCHES = 5

MAX_EXP = 6.0
TABLE_SIZE = 1000

# name -> (switches on, sentence-end tokens counted as words (</s> as word2vec/pWord2Vec read them))
VARIANTS = {
    "baseline": ((), False),
    "hogbatch": ((HOGBATCH,), False),
    "keep-center": ((KEEP_CENTER,), False),
    "dedupe": ((DEDUPE,), False),
    "sigmoid-table": ((SIGMOID_TABLE,), False),
    "flip": ((FLIP,), False),
    "sentence-token": ((), True),
    "pword2vec-like": ((HOGBATCH, SIGMOID_TABLE), True),
}

TOKENS_PER_CALL = 200_000  # the tokens of one call of the per-pair trainer


def sigmoid_table():
    """word2vec's table: sigma at TABLE_SIZE + 1 points evenly spaced on [-MAX_EXP, MAX_EXP]."""
    x = (np.arange(TABLE_SIZE + 1) / TABLE_SIZE * 2 - 1) * MAX_EXP
    return (1.0 / (1.0 + np.exp(-x))).astype(np.float32)


@njit(inline="always")
def _sigmoid(score, table):
    """Exact sigma (empty table), or word2vec's lookup: the bin's left edge, 0 or 1 beyond +-MAX_EXP."""
    if table.shape[0] == 0:
        return 1.0 / (1.0 + math.exp(-score))
    if score > MAX_EXP:
        return 1.0
    if score < -MAX_EXP:
        return 0.0
    return table[int((score + MAX_EXP) * (TABLE_SIZE / (2 * MAX_EXP)))]


@njit(inline="always")
def _pair_step(in_w, out_w, in_row, out_ids, n_out, lr, work, table):
    """One pair's sequential SGD step (the per-pair kernel's step, without the loss): out_ids[0] is the
    positive output row, the rest negatives; the input row moves last, by the old rows' gradient."""
    dim = in_w.shape[1]
    work[:] = 0.0
    for k in range(n_out):
        target = out_ids[k]
        score = np.float32(0.0)
        for t in range(dim):
            score += in_w[in_row, t] * out_w[target, t]
        prob = _sigmoid(score, table)
        step = np.float32(lr * (1.0 - prob)) if k == 0 else np.float32(-lr * prob)
        for t in range(dim):
            work[t] += step * out_w[target, t]
            out_w[target, t] += step * in_w[in_row, t]
    for t in range(dim):
        in_w[in_row, t] += work[t]


@njit(inline="always")
def _window_step(in_w, out_w, in_ids, n_in, out_ids, n_out, lr, corr, in_delta, table):
    """HogBatch on one window, with cpu_kernel.window_step's loops: the scores of all n_in x n_out
    pairs, then the input rows' steps from the old output rows (kept in in_delta), then the output
    rows' from the old input rows, then the input rows'; out_ids[0] is the positive output row.
    Only the sigmoid is switchable (table)."""
    _scores(in_w, out_w, in_ids, n_in, out_ids, n_out, corr)
    for o in range(n_out):
        for j in range(n_in):
            prob = _sigmoid(corr[o, j], table)
            corr[o, j] = np.float32(lr * (1.0 - prob)) if o == 0 else np.float32(-lr * prob)
    _input_steps(out_w, out_ids, n_out, n_in, corr, in_delta)
    _output_steps(in_w, in_ids, n_in, out_w, out_ids, n_out, corr)
    _add_rows(in_w, in_ids, n_in, in_delta)


@njit(inline="always")
def _draw_negatives(state, word, negative, accept, alias, uniform_share, keep_center, dedupe, out_ids):
    """out_ids[1:] <- the center's negatives (alias table, or with probability uniform_share a
    uniform word, as word2vec's table does where it holds </s>); returns (state, count + 1)."""
    vocab = np.uint64(accept.shape[0])
    n_out = 1
    for _ in range(negative):
        state, neg = _alias_draw(state, accept, alias)
        if uniform_share > 0.0:
            state = _lcg(state)
            if _uniform(state) < uniform_share:
                state = _lcg(state)
                neg = np.int64((state >> np.uint64(16)) % vocab)
        if neg == word and not keep_center:
            continue
        seen = False
        if dedupe:
            for k in range(1, n_out):
                seen |= out_ids[k] == neg
        if not seen:
            out_ids[n_out] = neg
            n_out += 1
    return state, n_out


@njit(parallel=True, fastmath=True, nogil=True, cache=True, error_model="numpy")
def trial_chunks(in_w, out_w, kept_ids, bounds, chunk_sentences, window, negative, accept, alias,
                 lr_first, lr_last, seed, switches, uniform_share, table):
    """The per-pair kernel the trainer ran before the HogBatch step (its chunks, seeds, draws and
    learning rates), with the switches above."""
    dim = in_w.shape[1]
    first_token = bounds[chunk_sentences[0]]
    span = max(1, bounds[chunk_sentences[-1]] - first_token)
    for chunk in prange(len(chunk_sentences) - 1):
        state = np.uint64(seed) ^ (np.uint64(chunk + 1) * np.uint64(0x9E3779B97F4A7C15))
        for _ in range(4):
            state = _lcg(state)
        work = np.empty(dim, dtype=np.float32)
        out_ids = np.empty(negative + 1, dtype=np.int64)
        in_ids = np.empty(2 * window, dtype=np.int64)
        corr = np.empty((negative + 1, 2 * window), dtype=np.float32)
        in_delta = np.empty((2 * window, dim), dtype=np.float32)
        for sentence in range(chunk_sentences[chunk], chunk_sentences[chunk + 1]):
            lo, hi = bounds[sentence], bounds[sentence + 1]
            for pos in range(lo, hi):
                lr = lr_first + (lr_last - lr_first) * (pos - first_token) / span
                state = _lcg(state)
                reach = 1 + np.int64((state >> np.uint64(16)) % np.uint64(window))
                word = np.int64(kept_ids[pos])
                out_ids[0] = word
                state, n_out = _draw_negatives(state, word, negative, accept, alias, uniform_share,
                                               switches[KEEP_CENTER], switches[DEDUPE], out_ids)
                n_in = _contexts(kept_ids, lo, hi, pos, reach, in_ids)
                if switches[HOGBATCH]:
                    _window_step(in_w, out_w, in_ids, n_in, out_ids, n_out, lr, corr, in_delta, table)
                    continue
                for j in range(n_in):
                    if switches[FLIP]:
                        out_ids[0] = in_ids[j]
                        _pair_step(in_w, out_w, word, out_ids, n_out, lr, work, table)
                    else:
                        _pair_step(in_w, out_w, in_ids[j], out_ids, n_out, lr, work, table)


# ---------------------------------------------------------------------------------------------
# Speed prototype: HogBatch as pWord2Vec computes it, rows gathered into small dense blocks and
# three sgemm calls a window (numba's np.dot), to compare with the loops of _window_step.

@njit(inline="always")
def _window_blas(in_w, out_w, in_ids, n_in, out_ids, n_out, lr, buffers):
    """HogBatch step as pWord2Vec's three sgemm calls on gathered copies of the rows."""
    dim = in_w.shape[1]
    corr_buf, in_flat, out_flat, in_delta_flat, out_delta_flat = buffers
    corr = corr_buf[:n_out * n_in].reshape((n_out, n_in))
    in_block = in_flat[:n_in * dim].reshape((n_in, dim))
    out_block = out_flat[:n_out * dim].reshape((n_out, dim))
    in_delta = in_delta_flat[:n_in * dim].reshape((n_in, dim))
    out_delta = out_delta_flat[:n_out * dim].reshape((n_out, dim))
    for j in range(n_in):
        in_row = in_ids[j]
        for t in range(dim):
            in_block[j, t] = in_w[in_row, t]
    for o in range(n_out):
        out_row = out_ids[o]
        for t in range(dim):
            out_block[o, t] = out_w[out_row, t]
    np.dot(out_block, in_block.T, corr)
    for o in range(n_out):
        for j in range(n_in):
            prob = 1.0 / (1.0 + math.exp(-corr[o, j]))
            corr[o, j] = np.float32(lr * (1.0 - prob)) if o == 0 else np.float32(-lr * prob)
    np.dot(corr, in_block, out_delta)
    np.dot(corr.T, out_block, in_delta)
    _add_rows(out_w, out_ids, n_out, out_delta)
    _add_rows(in_w, in_ids, n_in, in_delta)


@njit(fastmath=True, nogil=True, cache=True, error_model="numpy")
def blas_epoch(in_w, out_w, kept_ids, bounds, window, negative, accept, alias, lr, seed):
    """One thread's pass over the sentences of kept_ids (bounds: their starts and the end) with
    _window_blas steps; draws as trial_chunks' single chunk, constant learning rate."""
    dim = in_w.shape[1]
    state = np.uint64(seed) ^ np.uint64(0x9E3779B97F4A7C15)
    for _ in range(4):
        state = _lcg(state)
    out_ids = np.empty(negative + 1, dtype=np.int64)
    in_ids = np.empty(2 * window, dtype=np.int64)
    buffers = (np.empty((negative + 1) * 2 * window, dtype=np.float32), np.empty(2 * window * dim, dtype=np.float32),
               np.empty((negative + 1) * dim, dtype=np.float32), np.empty(2 * window * dim, dtype=np.float32),
               np.empty((negative + 1) * dim, dtype=np.float32))
    for sentence in range(len(bounds) - 1):
        lo, hi = bounds[sentence], bounds[sentence + 1]
        for pos in range(lo, hi):
            state = _lcg(state)
            reach = 1 + np.int64((state >> np.uint64(16)) % np.uint64(window))
            word = np.int64(kept_ids[pos])
            out_ids[0] = word
            state, n_out = _draw_negatives(state, word, negative, accept, alias, 0.0, 0, 0, out_ids)
            n_in = _contexts(kept_ids, lo, hi, pos, reach, in_ids)
            if n_in:
                _window_blas(in_w, out_w, in_ids, n_in, out_ids, n_out, lr, buffers)



def lr_at(progress, lr=0.025):
    """engines.lr_at: linear decay to 0.01% of lr."""
    return lr * max(1e-4, 1.0 - progress)


def variant_inputs(corpus, name):
    """(switches, uniform share of negatives, keep probabilities, sigmoid table) of a variant."""
    on, sentence_token = VARIANTS[name]
    switches = np.zeros(N_SWITCHES, dtype=np.int64)
    switches[list(on)] = 1
    counts = corpus.counts
    uniform_share = 0.0
    if sentence_token:  # </s> is a word of the vocabulary: in the frequencies, and a uniform word where drawn
        n_ends = len(corpus.sentence_starts)
        counts = np.append(counts, n_ends)
        weights = counts.astype(np.float64) ** 0.75
        uniform_share = float(weights[-1] / weights.sum())
    keep_prob = data.keep_probabilities(counts, 1e-3)[:len(corpus.counts)]
    table = sigmoid_table() if switches[SIGMOID_TABLE] else np.zeros(0, dtype=np.float32)
    return switches, uniform_share, keep_prob, table


def train_vectors(corpus, dim, negative, seed, threads, variant, epochs=5, window=5, lr=0.025):
    """The trainer's kernel run (the per-pair trainer's calls and seeds) with a variant's loop; the input vectors."""
    torch.manual_seed(seed)
    model = build_model("sgns", len(corpus.words), dim)
    in_w, out_w = model.in_embed.weight.data.numpy(), model.out_embed.weight.data.numpy()
    sampler = data.NegativeSampler(corpus.counts, 0.75)
    switches, uniform_share, keep_prob, table = variant_inputs(corpus, variant)
    threads = cpu_kernel.set_threads(threads)
    starts = corpus.sentence_starts
    bounds = np.append(starts, len(corpus)).astype(np.int64)
    for epoch in range(epochs):
        sentence = 0
        while sentence < len(starts):
            end = int(np.searchsorted(bounds, bounds[sentence] + TOKENS_PER_CALL))
            end = min(len(starts), max(sentence + 1, end))
            rng = data.epoch_rng(seed, epoch, sentence)
            kept_ids, kept_starts = data.subsample(corpus.token_ids[bounds[sentence]:bounds[end]],
                                                   starts[sentence:end] - bounds[sentence], keep_prob, rng)
            lr_first = lr_at((epoch + bounds[sentence] / len(corpus)) / epochs, lr)
            lr_last = lr_at((epoch + bounds[end] / len(corpus)) / epochs, lr)
            call_seed = int(rng.integers(1, 2**63))
            if len(kept_ids):
                kept_bounds = np.append(kept_starts, len(kept_ids)).astype(np.int64)
                targets = np.linspace(0, len(kept_ids), 4 * threads + 1)[1:-1]
                chunks = np.unique(np.concatenate([[0], np.searchsorted(kept_bounds, targets), [len(kept_starts)]]))
                trial_chunks(in_w, out_w, kept_ids, kept_bounds, chunks.astype(np.int64), window, negative,
                             sampler.accept, sampler.alias, lr_first, lr_last, call_seed, switches,
                             uniform_share, table)
            sentence = end
    return in_w


def run_quality(args):
    """Train and score every (setting, variant, seed); one JSON line each."""
    corpus = data.load_corpus(args.dataset, cache_dir=args.cache_dir)
    for dim, negative in args.settings:
        for variant in args.variants:
            for seed in args.seeds:
                start = time.time()
                vectors = train_vectors(corpus, dim, negative, seed, args.threads, variant, lr=args.lr)
                row = {"variant": variant, "dim": dim, "negative": negative, "seed": seed, "threads": args.threads,
                       "lr": args.lr, "train_s": round(time.time() - start, 1), **quality(corpus.words, vectors)}
                print(json.dumps(row), flush=True)


def speed_slice(corpus, n_tokens, seed=1):
    """The first n_tokens corpus tokens, subsampled once: (kept ids, sentence bounds in them)."""
    starts = corpus.sentence_starts[corpus.sentence_starts < n_tokens]
    keep_prob = data.keep_probabilities(corpus.counts, 1e-3)
    kept_ids, kept_starts = data.subsample(corpus.token_ids[:n_tokens], starts, keep_prob, np.random.default_rng(seed))
    return kept_ids, kept_starts, np.append(kept_starts, len(kept_ids)).astype(np.int64)


TRAINER = "trainer's kernel (HogBatch, loss sampled)"


def speed_runners(corpus, kept_ids, kept_starts, bounds, negative, lr=0.01):
    """name -> function(in_w, out_w) running one pass over the slice, one thread."""
    sampler = data.NegativeSampler(corpus.counts, 0.75)
    chunks = np.array([0, len(kept_starts)], dtype=np.int64)
    table = sigmoid_table()
    no_table = np.zeros(0, dtype=np.float32)

    def trial(*on, sigmoid=no_table):
        switches = np.zeros(N_SWITCHES, dtype=np.int64)
        switches[list(on)] = 1
        return lambda i, o: trial_chunks(i, o, kept_ids, bounds, chunks, 5, negative, sampler.accept, sampler.alias,
                                         lr, lr, 7, switches, 0.0, sigmoid)
    return {
        TRAINER: lambda i, o: cpu_kernel.train(i, o, kept_ids, bounds, [0, len(kept_ids)], 0, 7, [lr, lr], 5,
                                               negative, sampler),
        "pairs, no loss": trial(),
        "pairs, no loss, sigmoid table": trial(sigmoid=table),
        "window (HogBatch), blocked loops": trial(HOGBATCH),
        "window, blocked loops, sigmoid table": trial(HOGBATCH, sigmoid=table),
        "window, numba BLAS sgemm": lambda i, o: blas_epoch(i, o, kept_ids, bounds, 5, negative, sampler.accept,
                                                            sampler.alias, lr, 7),
    }


def run_speed(args):
    """CPU seconds per million corpus tokens of each loop, alternating, min and median over rounds."""
    corpus = data.load_corpus(args.dataset, cache_dir=args.cache_dir)
    kept_ids, kept_starts, bounds = speed_slice(corpus, args.tokens)
    cpu_kernel.set_threads(1)
    rng = np.random.default_rng(0)
    for dim in args.dims:
        negative = 5 if dim <= 100 else 10
        start_in = ((rng.random((len(corpus.words), dim), dtype=np.float32) - 0.5) / dim)
        start_out = np.zeros_like(start_in)
        runners = speed_runners(corpus, kept_ids, kept_starts, bounds, negative)
        runners["pairs, no loss"](start_in, start_out)  # a trained-like state, not all-zero output rows
        times = {name: [] for name in runners}
        for round_ in range(args.rounds + 1):  # round 0 compiles or loads every loop
            for name, run in runners.items():
                in_w, out_w = start_in.copy(), start_out.copy()
                began = time.process_time()
                run(in_w, out_w)
                if round_:
                    times[name].append((time.process_time() - began) / args.tokens * 1e6)
        base = float(np.median(times[TRAINER]))
        print(f"\nd={dim}, {negative} negatives: CPU s per million corpus tokens ({args.tokens:,} tokens, "
              f"{len(kept_ids):,} kept), {args.rounds} rounds alternating")
        for name, values in times.items():
            print(f"  {name:42}min {min(values):6.2f}  median {np.median(values):6.2f}  "
                  f"({base / np.median(values):.2f}x the trainer's kernel)", flush=True)


# ---------------------------------------------------------------------------------------------
# The run's tail: writing the vectors. gensim's save_word2vec_format formats every float in Python.

def run_export(args):
    """CPU seconds of the run's tail at each d: gensim's writer (and its import) against
    export.write_word2vec, and tensorboardX's projector snapshot of the 10,000 most frequent words
    against export.write_projector_snapshot."""
    import tempfile

    import export
    corpus = data.load_corpus(args.dataset, cache_dir=args.cache_dir)
    export.format_rows(np.zeros((1, 1), dtype=np.float32), 6, 32)  # load (or compile) it outside the clock
    rng = np.random.default_rng(0)
    began = time.process_time()
    from gensim.models import KeyedVectors
    print(f"import gensim.models: {time.process_time() - began:.2f} s CPU")
    with tempfile.TemporaryDirectory() as tmp:
        from tensorboardX import SummaryWriter
        writer = SummaryWriter(tmp)
        for dim in args.dims:
            vectors = ((rng.random((len(corpus.words), dim)) - 0.5) * 2).astype(np.float32)
            began = time.process_time()
            keyed = KeyedVectors(dim)
            keyed.add_vectors(corpus.words, vectors)
            keyed.save_word2vec_format(f"{tmp}/gensim.txt")
            gensim_s = time.process_time() - began
            began = time.process_time()
            export.write_word2vec(f"{tmp}/ours.txt", corpus.words, vectors)
            ours_s = time.process_time() - began
            error = np.abs(KeyedVectors.load_word2vec_format(f"{tmp}/ours.txt").vectors - vectors).max()
            began = time.process_time()
            writer.add_embedding(torch.from_numpy(vectors[:10_000]), metadata=corpus.words[:10_000], global_step=dim)
            tensorboardx_s = time.process_time() - began
            began = time.process_time()
            export.write_projector_snapshot(f"{tmp}/ours", corpus.words[:10_000], vectors[:10_000], dim)
            projector_s = time.process_time() - began
            print(f"d={dim}: gensim save_word2vec_format {gensim_s:.2f} s, export.write_word2vec {ours_s:.2f} s "
                  f"(max error {error:.1e}); projector snapshot: tensorboardX {tensorboardx_s:.2f} s, "
                  f"export.write_projector_snapshot {projector_s:.2f} s CPU")
        writer.close()


PHASE_CHILD = """
import json, os, sys, time
sys.argv[0] = {trainer!r}
sys.path.insert(0, {root!r})
wall = {{"start": float(os.environ["PHASES_T0"])}}
marks = []
def mark(name):
    marks.append((name, time.time() - wall["start"], time.process_time()))
mark("interpreter up")
import trainer, cpu_kernel, data, engines, export
mark("imports of trainer.py")
def timed(owner, name, label=None):
    inner = getattr(owner, name)
    def wrapper(*a, **k):
        result = inner(*a, **k)
        mark(label or name)
        return result
    setattr(owner, name, wrapper)
for owner, name in ((data, "load_corpus"), (trainer, "build_model"), (trainer, "make_writer"),
                    (cpu_kernel, "warm_up"), (engines, "kernel_epoch"), (trainer.Run, "save"),
                    (export, "write_projector_snapshot"), (export, "write_word2vec"), (trainer, "write_pictures")):
    timed(owner, name)
code = trainer.main({argv!r})
mark("exit")
print(json.dumps(marks))
"""


def run_phases(args):
    """Wall and CPU time from process start to each landmark of a trainer run (one line per landmark)."""
    import os
    import subprocess
    argv = ["--dataset", args.dataset, "--cache-dir", args.cache_dir, "--embed-size", str(args.dim),
            "--neg-sample-size", str(args.negative), "--epochs", str(args.epochs), "--num-threads", str(args.threads),
            "--pip-interval", "0", "--quiet", "--log-dir", "/tmp/kernel_trials_runs", "--export",
            "/tmp/kernel_trials_phases.txt"]
    data.load_corpus(args.dataset, cache_dir=args.cache_dir)
    child = PHASE_CHILD.format(trainer=str(ROOT / "trainer.py"), root=str(ROOT), argv=argv)
    env = {**os.environ, "PHASES_T0": repr(time.time())}
    out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, check=True).stdout
    marks = json.loads(out.strip().splitlines()[-1])
    previous_wall, previous_cpu = 0.0, 0.0
    print(f"{'after':28}{'wall s':>8}{'+wall':>8}{'cpu s':>8}{'+cpu':>8}")
    for name, wall, cpu in marks:
        print(f"{name:28}{wall:8.2f}{wall - previous_wall:8.2f}{cpu:8.2f}{cpu - previous_cpu:8.2f}")
        previous_wall, previous_cpu = wall, cpu


WIDTH_CHILD = """
import sys, time
sys.path.insert(0, {root!r})
import numpy as np, cpu_kernel, data
sys.path.insert(0, {bench!r})
from kernel_trials import speed_slice
corpus = data.load_corpus({dataset!r}, cache_dir={cache!r})
kept_ids, _, bounds = speed_slice(corpus, {tokens})
steps = np.append(np.arange(0, len(kept_ids), 10_000), len(kept_ids))
sampler = data.NegativeSampler(corpus.counts, 0.75)
cpu_kernel.set_threads(1)
start_in = (np.random.default_rng(1).random((len(corpus.words), {dim}), dtype=np.float32) - 0.5) / {dim}
cpu_kernel.warm_up(start_in.copy(), np.zeros_like(start_in), sampler, 5, {negative})
best = float("inf")
for _ in range(3):
    in_w, out_w = start_in.copy(), np.zeros_like(start_in)
    began = time.process_time()
    cpu_kernel.train(in_w, out_w, kept_ids, bounds, steps, 0, 1, np.linspace(0.025, 0.02, len(steps)), 5, {negative},
                     sampler)
    best = min(best, time.process_time() - began)
print(best, len(kept_ids))
"""


def run_widths(args):
    """The kernel's CPU time with 512-bit and 256-bit vectors, and pWord2Vec_blas's on the same slice."""
    import dataclasses
    import resource
    import subprocess
    import tempfile
    from llvmlite import binding as llvm
    from bench_peers import tool_env, write_corpus_text
    features = llvm.get_host_cpu_features().flatten()
    corpus = data.load_corpus(args.dataset, cache_dir=args.cache_dir)
    starts = corpus.sentence_starts[corpus.sentence_starts < args.tokens]
    with tempfile.TemporaryDirectory() as tmp:
        text = Path(tmp) / "slice.txt"
        write_corpus_text(dataclasses.replace(corpus, token_ids=corpus.token_ids[:args.tokens], sentence_starts=starts),
                          text)
        print(f"one thread, {args.tokens:,} corpus tokens, CPU s (ours: best of 3 passes; pWord2Vec_blas: its "
              f"whole process, one pass, reading included)")
        for dim, negative in args.settings:
            row = []
            for width in ("-prefer-256-bit", "+prefer-256-bit"):  # 512-bit vectors, then 256-bit
                child = WIDTH_CHILD.format(root=str(ROOT), bench=str(ROOT / "bench"), dataset=args.dataset,
                                           cache=args.cache_dir, tokens=args.tokens, dim=dim, negative=negative)
                env = {**tool_env(args), "NUMBA_CPU_FEATURES": f"{features},{width}", "NUMBA_CACHE_DIR": tmp}
                out = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, check=True)
                row.append(float(out.stdout.split()[0]))
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([str(Path(args.peers_dir) / "pWord2Vec_blas"), "-train", str(text), "-output",
                            str(Path(tmp) / "v.txt"), "-size", str(dim), "-window", "5", "-negative", str(negative),
                            "-sample", "1e-3", "-threads", "1", "-iter", "1", "-min-count", "5", "-binary", "0",
                            "-batch-size", "11", "-alpha", "0.025"], env=tool_env(args), capture_output=True,
                           check=True)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            peer = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            print(f"d={dim}, {negative} negatives: ours 512-bit {row[0]:.3f}, 256-bit {row[1]:.3f} "
                  f"({row[1] / row[0]:.2f}x); pWord2Vec_blas {peer:.3f} ({peer / row[0]:.2f}x ours 512-bit)",
                  flush=True)


def get_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=str(ROOT.parent / "shared" / "corpora" / "gutenberg"))
    parser.add_argument("--cache-dir", default=str(ROOT / "data" / "cache"))
    parser.add_argument("--threads", type=int, default=1, help="kernel threads")
    commands = parser.add_subparsers(dest="command", required=True)
    trials = commands.add_parser("quality", help="train with each variant and score the vectors")
    trials.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["baseline"])
    trials.add_argument("--settings", nargs="+", type=parse_setting, default=[(100, 5), (200, 10)], metavar="D[:K]")
    trials.add_argument("--seeds", nargs="+", type=int, default=[1])
    trials.add_argument("--lr", type=float, default=0.025, help="starting learning rate")
    speed = commands.add_parser("speed", help="CPU time of the per-pair loop against window-batched updates")
    speed.add_argument("--dims", nargs="+", type=int, default=[50, 100, 200, 300])
    speed.add_argument("--rounds", type=int, default=5, help="timed passes of each loop (one more warms up)")
    speed.add_argument("--tokens", type=int, default=300_000, help="corpus tokens in the timed slice")
    export = commands.add_parser("export", help="CPU time of writing the vectors, gensim's way and export.py's")
    export.add_argument("--dims", nargs="+", type=int, default=[50, 100, 200, 300])
    widths = commands.add_parser("widths", help="CPU time of the kernel with 512- and 256-bit vectors, and of "
                                                "pWord2Vec_blas, one thread, on one slice")
    widths.add_argument("--settings", nargs="+", type=parse_setting, default=[(100, 5), (300, 10)], metavar="D[:K]")
    widths.add_argument("--tokens", type=int, default=400_000, help="corpus tokens in the slice")
    widths.add_argument("--peers-dir", default="/tmp/sgns-peers", help="where ../shared/peers/build.sh put the peers")
    phases = commands.add_parser("phases", help="where a trainer.py run spends its time, start to exit")
    phases.add_argument("--dim", type=int, default=100)
    phases.add_argument("--negative", type=int, default=5)
    phases.add_argument("--epochs", type=int, default=5)
    return parser


if __name__ == "__main__":
    parser = get_parser()
    args = parser.parse_args()
    if args.command == "speed" and args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.command == "quality":
        run_quality(args)
    elif args.command == "speed":
        run_speed(args)
    elif args.command == "export":
        run_export(args)
    elif args.command == "phases":
        run_phases(args)
    elif args.command == "widths":
        run_widths(args)
