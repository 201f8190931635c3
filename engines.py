"""The training engines: which code trains the vectors, and the three epoch loops.

ENGINES decides, from a run's model, optimizer, device and distribution, which loop trains:

- kernel_epoch: the compiled word2vec loop on the CPU (cpu_kernel), sgns by plain SGD;
- window_epoch: batched SGD steps on whole windows drawn on the model's device
  (data.WindowBatches), sgns by plain SGD. The step (WindowStep: grads, then apply) runs as
  compiled per-row loops on the CPU (cpu_kernel.TouchedRows), as Triton kernels on a GPU
  (gpu_kernel), or as the tensor ops of model.SGNS; on a GPU whole draws of steps replay as
  captured CUDA graphs;
- spelling_epoch: the rnn model on one CPU process: the compiled loop trains the vectors of a
  step's words, then the spelling encoder learns their summed change in one backward pass;
- autograd_epoch: torch.optim steps on (center, context) pairs by autograd: SparseAdam, Adam,
  the rnn model on a GPU or several processes, and --multi-gpu's DataParallel.

All four run one epoch of this rank's share of the corpus in steps of one size: the kept
centers that --batch-size pairs hold (a center has window + 1 pairs on average), split across
ranks. A position inside an epoch is the number of steps done, and step i draws its random
numbers from a generator seeded by (seed, epoch, rank, i) (a draw of window steps: by its first
step), so a stopped run resumes exactly where it stopped, whatever the loop. Distribution is a
strategy the loops call (distributed.OneProcess, SyncRanks, AsyncRanks): before a step (a
sync point of --async), between a window step's two phases (gather_rows: --sync applies every
rank's rows), around an autograd step, and at the end of the epoch.
"""
import concurrent.futures
import contextlib
import functools
import math
from dataclasses import dataclass

import numpy as np

import cpu_kernel
import data
import tables
from lazy import LazyModule, torch

models = LazyModule("model")  # torch's modules: the compiled loop on one process trains tables.Tables

# Most centers one call of the compiled kernel trains: the loop looks at signals and progress
# between calls, so a call is kept short next to a human's patience (well under a second), and
# long next to the threads' wait for each other at its end.
CENTERS_PER_KERNEL_CALL = 1_000_000
# The rnn model's SGD rate for its tables (per-word input part, output table) at the start of a
# run, decayed as --lr is; --lr itself is the rnn encoder's. Twice word2vec's: the per-word part
# takes only --word-share of each change (bench/RESULTS.md, RNN-SGNS).
RNN_TABLE_LR = 0.05
# How an n-gram row of the rnn model learns on the CPU loop: each step it moves by GRAM_SHARE of
# the summed changes of the step's words that have it, over their number to the power GRAM_POW.
# Summed whole, the changes of the many words that share a short n-gram ("ing>") overshoot and
# diverge; averaged (power 1), shared n-grams barely learn (bench/RESULTS.md, RNN-SGNS).
GRAM_SHARE = 0.8
GRAM_POW = 0.5

# (model, optimizer, device type, distribution) -> loop; the first matching row wins, "*" matches
# anything. distribution: "one" process, "multi-gpu" (DataParallel), or --multi-node "sync"/"async".
ENGINES = (
    ("sgns", "sgd", "cpu", "one", "kernel"),
    ("sgns", "sgd", "cpu", "async", "kernel"),
    ("sgns", "sgd", "*", "multi-gpu", "autograd"),  # DataParallel cannot reduce sparse gradients
    ("sgns", "sgd", "*", "*", "window"),
    ("rnn", "*", "cpu", "one", "spelling"),
    ("*", "*", "*", "*", "autograd"),
)


def choose_loop(model_name, optimizer, device_type, distribution, engine="auto"):
    """The loop that trains a run: ENGINES' first match; --engine torch skips the kernel rows,
    --engine kernel must match one. Returns (loop, None) or (None, why not)."""
    key = (model_name, optimizer, device_type, distribution)
    for *row, loop in ENGINES:
        if all(want in ("*", have) for want, have in zip(row, key)):
            if engine == "torch" and loop in ("kernel", "spelling"):
                continue
            if engine == "kernel" and loop not in ("kernel", "spelling"):
                return None, ("--engine kernel trains sgns by plain SGD on the CPU, on one process or with "
                              "--multi-node --async, and rnn on one CPU process; use --engine torch (or auto) "
                              "for this run")
            return loop, None
    raise AssertionError("ENGINES ends with a row that matches everything")


def lr_at(args, progress):
    """Linear decay from --lr to 0.01% of it over the whole run; progress in [0, 1]."""
    return args.lr * max(1e-4, 1.0 - progress)


def centers_per_step(batch_size, window_size, world_size=1):
    """Kept centers in one rank's step: the global batch of pairs split across ranks (a center
    has about window + 1 real pairs)."""
    return max(1, batch_size // world_size // (window_size + 1))


@dataclass
class Epoch:
    """What every loop knows of the epoch it runs: its index, the size and count of its steps,
    and how to report a step and read a pending signal."""
    index: int
    first_step: int
    per_step: int
    n_steps: int
    report: object  # report(steps_done, loss_sum, pairs, words_done, lr)
    signal: object  # signal() -> pending SIGINT/SIGTERM number, or 0

    def words(self, n_corpus, steps_done):
        """Corpus words covered once steps_done steps are done (integers that add up to the corpus)."""
        return round(n_corpus * steps_done / self.n_steps)


class Engine:
    """A run's model, optimizer, data and distribution strategy, with the loop that trains them.

    train_model is what the autograd loop calls: the model, or its DataParallel or
    DistributedDataParallel wrapper. window_step is the window loop's step (a WindowStep), chosen once.
    """

    def __init__(self, args, model, optimizer, corpus, strategy, loop, device):
        self.args, self.model, self.optimizer, self.corpus = args, model, optimizer, corpus
        self.strategy, self.loop = strategy, loop
        # numpy tables train without torch (lazy.py): a torch device only where torch trains
        self.device = None if isinstance(model, tables.Tables) else torch.device(device)
        self.sampler = data.NegativeSampler(corpus.counts, args.ns_exponent)
        self.keep_prob = data.keep_probabilities(corpus.counts, args.subsample_th)
        self.train_model = strategy.wrap(model) if loop == "autograd" else model
        self.batches = self.graphs = self.inputs = self.hot_rows = None
        if loop == "kernel":
            self.hot_rows = cpu_kernel.HotRows(corpus.counts, model.embed_size)
            self.tables = _kernel_tables(model, self.hot_rows.extra_rows)
        if loop == "spelling":  # the kernel's input table: rows refilled from the model before each step
            self.inputs = np.zeros((model.vocab_size, model.embed_size), dtype=np.float32)
            self.pool = concurrent.futures.ThreadPoolExecutor(args.num_threads, thread_name_prefix="encoder")
        if loop == "window":
            self.batches = data.WindowBatches(corpus, self.keep_prob, self.sampler, args.window_size,
                                              args.neg_sample_size, self.device)
            self.window_step = choose_window_step(model, self.device, args.gpu_kernel)
            if strategy.world_size == 1:
                self.graphs = window_graphs(self.window_step, model, args, self.device)
        self._warm_up()

    def _warm_up(self):
        """Have numba load (or compile) what the loop runs before the first epoch starts its clock."""
        if self.loop in ("kernel", "spelling"):
            cpu_kernel.warm_up(*self._tables(), self.sampler, self.args.window_size, self.args.neg_sample_size)
        elif self.loop == "window" and self.device.type == "cpu":
            cpu_kernel.warm_up_rows()
        if self.loop == "spelling":  # on no words, with the argument types of the real calls
            no_ids, no_change = np.zeros(0, dtype=np.int64), np.zeros((0, self.model.embed_size), dtype=np.float32)
            cpu_kernel.add_gram_changes(self.model.gram_embed.weight.detach().numpy(), no_ids, no_ids, no_change,
                                        GRAM_SHARE, GRAM_POW)
        self.strategy.warm_up(self.device)

    def _tables(self):
        if self.loop == "kernel":
            return self.tables
        inputs = self.model.in_embed.weight.data.numpy() if self.inputs is None else self.inputs
        return inputs, self.model.out_embed.weight.data.numpy()

    def run(self, epoch, first_step, report, signal):
        """Train one epoch from step first_step; returns the agreed stop signal, or 0 at its end."""
        per_step = centers_per_step(self.args.batch_size, self.args.window_size, self.strategy.world_size)
        loop = {"kernel": kernel_epoch, "window": window_epoch, "spelling": spelling_epoch,
                "autograd": autograd_epoch}[self.loop]
        self.strategy.on_epoch_start(self.model)
        stop = loop(self, Epoch(epoch, first_step, per_step, 0, report, signal))
        return self.strategy.on_epoch_end(stop)

    def lr(self, epoch, step):
        return lr_at(self.args, (epoch.index + step / epoch.n_steps) / self.args.epochs)

    def host_share(self, epoch, shuffled):
        """This rank's kept tokens of the epoch, on the host: (ids, sentence starts, total kept over ranks)."""
        kept_ids, starts = data.subsample(self.corpus.token_ids, self.corpus.sentence_starts, self.keep_prob,
                                          data.epoch_rng(self.args.seed, epoch))
        ids, local_starts = data.epoch_share(kept_ids, starts, self.args.seed, epoch, self.strategy.rank,
                                             self.strategy.world_size, shuffled)
        return ids, local_starts, len(kept_ids)


def _kernel_tables(model, extra_rows):
    """The model's two tables as the CPU kernel trains them: extra_rows more rows below its own,
    where the kernel's threads train their copies of the hot rows (cpu_kernel.HotRows), and rows that
    start on a cache line (cpu_kernel.ROW_ALIGN floats), where the kernel's vector loads would
    otherwise each straddle two lines. The model's weights become views of the tables: a
    tables.Tables' arrays, or model.SGNS's tensors (--multi-node --async)."""
    if isinstance(model, tables.Tables):
        (in_table, model.in_weight), (out_table, model.out_weight) = (
            _room_below(weight, extra_rows) for weight in (model.in_weight, model.out_weight))
        return in_table, out_table
    kept = []
    for embedding in (model.in_embed, model.out_embed):
        table, rows = _room_below(embedding.weight.data.numpy(), extra_rows)
        embedding.weight.data = torch.from_numpy(rows)
        kept.append(table)
    return tuple(kept)


def _room_below(weight, extra_rows):
    """(table, rows): weight copied into a table with extra_rows more rows, each starting on a
    cache line, and the table's first rows, which hold it (weight itself where it is such a table)."""
    n_rows, width = weight.shape
    stride = -(-width // cpu_kernel.ROW_ALIGN) * cpu_kernel.ROW_ALIGN
    line = cpu_kernel.ROW_ALIGN * weight.itemsize
    if not extra_rows and stride == width and weight.ctypes.data % line == 0:
        return weight, weight
    # numpy starts a large array 16 bytes into a page: the table starts where a line does
    n_bytes = (n_rows + extra_rows) * stride * weight.itemsize
    memory = np.zeros(n_bytes + line, dtype=np.uint8)
    start = -memory.ctypes.data % line
    table = memory[start:start + n_bytes].view(weight.dtype).reshape(n_rows + extra_rows, stride)[:, :width]
    table[:n_rows] = weight
    return table, table[:n_rows]


def epoch_steps(n_kept, per_step, world_size):
    """Steps every rank makes: its share (the larger one, shares differing by one token at most) over per_step."""
    return max(1, math.ceil(math.ceil(n_kept / world_size) / per_step))


# ---------------------------------------------------------------------------------------------
# The compiled CPU kernel

def _kernel_plan(engine, epoch, shuffled):
    """What cpu_kernel.train needs of this rank's epoch: (kept ids, step bounds, sentence bounds
    with the end appended, the steps' base seed); sets epoch.n_steps."""
    kept_ids, starts, n_kept = engine.host_share(epoch.index, shuffled)
    epoch.n_steps = epoch_steps(n_kept, epoch.per_step, engine.strategy.world_size)
    step_bounds = np.minimum(np.arange(epoch.n_steps + 1, dtype=np.int64) * epoch.per_step, len(kept_ids))
    sentence_bounds = np.append(starts, len(kept_ids)).astype(np.int64)
    return kept_ids, step_bounds, sentence_bounds, data.step_seed(engine.args.seed, epoch.index,
                                                                  engine.strategy.rank)


def kernel_epoch(engine, epoch):
    """One epoch of word2vec's pair-by-pair SGD (cpu_kernel), a call of many steps at a time.

    A call ends at the next sync point of --async (so the exchange sees whole steps), marks the
    rows it writes where the exchange wants them (strategy.row_marks), and holds at
    most CENTERS_PER_KERNEL_CALL centers; each step still reports on its own, so Batch loss
    comes at the same rate in words as on the other loops.
    """
    args, strategy = engine.args, engine.strategy
    # Sentence blocks in a new random order each epoch, on one process too: in file order, a corpus of
    # books ends every epoch on the same book, and the threads (which split each call's steps in
    # two runs) train neighbouring text (bench/RESULTS.md, the 6x corpus).
    kept_ids, step_bounds, sentence_bounds, base_seed = _kernel_plan(engine, epoch, shuffled=True)
    steps_per_call = max(1, CENTERS_PER_KERNEL_CALL // epoch.per_step)
    in_w, out_w = engine._tables()
    marks = strategy.row_marks(*engine.model.parameters())
    step = epoch.first_step
    while step < epoch.n_steps:
        stop = strategy.before_step(step, epoch.first_step, epoch.signal())
        if stop:
            return stop
        end = min(epoch.n_steps, step + steps_per_call, strategy.next_sync_point(step))
        lrs = [engine.lr(epoch, i) for i in range(step, end + 1)]
        losses, pairs = cpu_kernel.train(in_w, out_w, kept_ids, sentence_bounds, step_bounds[step:end + 1], step,
                                         base_seed, lrs, args.window_size, args.neg_sample_size, engine.sampler,
                                         marks, engine.hot_rows)
        for i in range(step, end):
            epoch.report(i + 1, float(losses[i - step]), int(pairs[i - step]), _step_words(engine, epoch, i),
                         lrs[i + 1 - step])
        step = end
    return 0


# ---------------------------------------------------------------------------------------------
# The rnn model on the CPU: compiled SGD on the vectors, one encoder step per step

def spelling_epoch(engine, epoch):
    """One epoch of the rnn model (model.RNNSGNS) on one CPU process, a step at a time.

    A step's input vectors (per-word part plus spelling) are written into the kernel's input
    table for the distinct words the step can touch; the compiled loop trains them and the
    output table by word2vec's SGD at the table rate (RNN_TABLE_LR, decayed as --lr); the
    change of each input vector, the step's summed gradient times -rate, goes in part
    (--word-share) to the per-word part, to the word's n-gram rows (cpu_kernel.add_gram_changes),
    and whole, through one backward pass over the distinct words, to the encoder, which the
    run's optimizer steps at --lr. The encoder thus costs a forward and a backward pass per
    distinct word per step, not per pair.
    """
    kept_ids, step_bounds, sentence_bounds, base_seed = _kernel_plan(engine, epoch, shuffled=False)
    with _encoder_settings():
        return _spelling_steps(engine, epoch, kept_ids, step_bounds, sentence_bounds, base_seed)


def _spelling_steps(engine, epoch, kept_ids, step_bounds, sentence_bounds, base_seed):
    """The steps of spelling_epoch from epoch.first_step; returns the stop signal, or 0."""
    args, strategy = engine.args, engine.strategy
    for step in range(epoch.first_step, epoch.n_steps):
        stop = strategy.before_step(step, epoch.first_step, epoch.signal())
        if stop:
            return stop
        lo, hi = step_bounds[step], step_bounds[step + 1]
        # contexts reach at most --window-size tokens beyond the step's centers
        ids = np.unique(kept_ids[max(0, lo - args.window_size):hi + args.window_size]).astype(np.int64)
        rates = [RNN_TABLE_LR * engine.lr(epoch, i) / args.lr for i in (step, step + 1)]
        loss, pairs = _spelling_step(engine, torch.from_numpy(ids), kept_ids, sentence_bounds,
                                     step_bounds[step:step + 2], step, base_seed, rates, engine.lr(epoch, step))
        epoch.report(step + 1, loss, pairs, _step_words(engine, epoch, step), engine.lr(epoch, step))
    return 0


def _spelling_step(engine, ids, kept_ids, sentence_bounds, bounds, step, base_seed, rates, encoder_lr):
    """One step of spelling_epoch on the distinct words ids; returns (loss sum, pairs)."""
    model, args, inputs = engine.model, engine.args, engine.inputs
    parts = torch.tensor_split(ids, max(1, min(args.num_threads, len(ids))))
    spelled_parts = list(engine.pool.map(model.encode, parts))
    spelled = torch.cat(spelled_parts)
    with torch.no_grad():
        gram_ids, gram_counts = model.grams_of(ids)
        before = model.word_embed.weight[ids] + spelled + model.gram_mean(gram_ids, gram_counts)
    inputs[ids.numpy()] = before.numpy()
    losses, pairs = cpu_kernel.train(inputs, model.out_embed.weight.data.numpy(), kept_ids, sentence_bounds,
                                     bounds, step, base_seed, rates, args.window_size, args.neg_sample_size,
                                     engine.sampler)
    change = torch.from_numpy(inputs[ids.numpy()]) - before
    with torch.no_grad():
        model.word_embed.weight.index_add_(0, ids, change, alpha=args.word_share)
        cpu_kernel.add_gram_changes(model.gram_embed.weight.detach().numpy(), gram_ids.numpy(), gram_counts.numpy(),
                                    change.numpy(), GRAM_SHARE, GRAM_POW)
    for group in engine.optimizer.param_groups:
        group["lr"] = encoder_lr
    # the change is -rate times the summed gradient of the loss in each input vector
    _encoder_gradient(engine, spelled_parts, torch.split(-change / rates[0], [len(p) for p in parts]))
    engine.optimizer.step()
    return float(losses[0]), int(pairs[0])


def _encoder_gradient(engine, spelled_parts, grad_parts):
    """Back-propagate each part on its own thread, then sum the parts' gradients in their order:
    the same sum whatever thread finishes first."""
    params = list(engine.model.encoder.parameters())

    def backward(i):
        return torch.autograd.grad(spelled_parts[i], params, grad_parts[i], allow_unused=True)
    per_part = list(engine.pool.map(backward, range(len(spelled_parts))))
    for j, param in enumerate(params):
        grads = [grads[j] for grads in per_part if grads[j] is not None]
        param.grad = functools.reduce(torch.add, grads) if grads else None


@contextlib.contextmanager
def _encoder_settings():
    """Each of the encoder's operations on one torch thread, by torch's own CPU code: they are too
    small to share among threads (the second one mostly waits), so the step's words are split among
    --num-threads threads instead (Engine.pool). The compiled loop keeps its --num-threads threads
    (numba's own)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with models.without_onednn():
            yield
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------
# Window steps on the model's device

def window_epoch(engine, epoch):
    """One epoch of batched SGD on whole windows, drawn on the model's device.

    Windows and negatives are drawn data.STEPS_PER_DRAW steps at a time, and the loss and pair
    counts stay on the device until the report reads them. On a GPU of a single process, a
    whole draw replays as one captured CUDA graph (engine.graphs): a stop asked for mid-draw
    then takes effect at the end of the draw, whose steps are all applied already.
    """
    args, strategy = engine.args, engine.strategy
    kept_ids, kept_sentence, n_kept = window_stream(engine, epoch.index)
    epoch.n_steps = epoch_steps(n_kept, epoch.per_step, strategy.world_size)
    per_draw = data.STEPS_PER_DRAW
    for draw_first in range(epoch.first_step - epoch.first_step % per_draw, epoch.n_steps, per_draw):
        draw_end = min(draw_first + per_draw, epoch.n_steps)
        lo = min(draw_first * epoch.per_step, len(kept_ids))
        hi = min(draw_end * epoch.per_step, len(kept_ids))
        generator = engine.batches.seeded(args.seed, epoch.index, 1 + strategy.rank, draw_first)
        drawn = engine.batches.windows(kept_ids, kept_sentence, lo, hi - lo, generator)
        first = max(epoch.first_step, draw_first)
        whole = engine.graphs is not None and first == draw_first and hi - lo == per_draw * epoch.per_step
        stop = (_replay_draw if whole else _draw_step_by_step)(engine, epoch, drawn, draw_first, first, draw_end)
        if stop:
            return stop
    return 0


def window_stream(engine, epoch):
    """The epoch's kept ids of this rank and the sentence of each, on the device, and the kept
    count over all ranks. One process subsamples on the device itself; ranks share the host's
    subsampling, the same on every rank, and take their part of it."""
    if engine.strategy.world_size == 1:
        kept_ids, kept_sentence = engine.batches.subsample(engine.args.seed, epoch)
        return kept_ids, kept_sentence, len(kept_ids)
    ids, starts, n_kept = engine.host_share(epoch, shuffled=True)
    return (*engine.batches.to_device(ids, starts), n_kept)


def _draw_window(drawn, epoch, draw_first, step):
    offset = (step - draw_first) * epoch.per_step
    return [t[offset:offset + epoch.per_step] for t in drawn]


def _draw_step_by_step(engine, epoch, drawn, draw_first, first, draw_end):
    """The steps first..draw_end-1 of a draw, one by one; returns the agreed stop signal or 0."""
    strategy = engine.strategy
    for step in range(first, draw_end):
        stop = strategy.before_step(step, epoch.first_step, epoch.signal())
        if stop:
            return stop
        window = _draw_window(drawn, epoch, draw_first, step)
        lr = engine.lr(epoch, step)
        if engine.graphs is not None and len(window[0]) == epoch.per_step:  # one process: nothing to exchange
            stats, stop = engine.graphs.step(*window, lr), epoch.signal()
        else:
            rows, stop = strategy.gather_rows(engine.window_step, window, epoch.per_step, epoch.signal())
            engine.window_step.apply(rows, lr)
            stats = rows.stats
        _report_window_step(engine, epoch, step, stats, lr)
        if stop:
            return stop
    return 0


def _replay_draw(engine, epoch, drawn, draw_first, first, draw_end):
    """A whole draw in one CUDA graph replay (one process); the signal is read after it."""
    lrs = [engine.lr(epoch, step) for step in range(draw_first, draw_end)]
    all_stats = engine.graphs.draw(*drawn, lrs)
    for step, stats, lr in zip(range(draw_first, draw_end), all_stats, lrs):
        _report_window_step(engine, epoch, step, stats, lr)
    return epoch.signal()


def _report_window_step(engine, epoch, step, stats, lr):
    epoch.report(step + 1, stats[0], stats[1], _step_words(engine, epoch, step), lr)


def choose_window_step(model, device, gpu_kernel=True):
    """The window step for the model's device, chosen once: compiled row loops on the CPU,
    Triton kernels on a GPU where they run (and --gpu-kernel), else tensor ops."""
    if device.type == "cpu":
        return CompiledStep(model)
    if device.type == "cuda" and gpu_kernel and _triton_usable(device):
        return TritonStep(model)
    return TensorStep(model)


class WindowStep:
    """One SGD step on whole windows (model.SGNS.window_step), in two phases: grads(windows)
    gives the step's gradient as model.Rows, apply(rows, lr) writes them into the tables. A
    --sync exchange runs between the two (distributed.SyncRanks.gather_rows). Calling the step
    runs both phases on this process's rows and returns their [loss sum, pairs]."""

    def __init__(self, model):
        self.model = model

    def __call__(self, context_ids, weight, out_ids, lr):
        rows = self.grads(context_ids, weight, out_ids)
        self.apply(rows, lr)
        return rows.stats


class CompiledStep(WindowStep):
    """The CPU's form: the products of model.window_grads, then compiled loops
    (cpu_kernel.TouchedRows) sum each touched row's gradient once and apply it once."""

    def grads(self, context_ids, weight, out_ids, room=None):
        """The step's distinct rows; room(n), if given, is where its n rows go (default: reused storage)."""
        touched = cpu_kernel.touched_rows(self.model.vocab_size, self.model.embed_size)
        n_rows = touched.number(context_ids.numpy(), weight.numpy(), out_ids.numpy())
        packed = (room or touched.buffer)(n_rows)
        loss_sum, _, in_grads, _, out_grads = self.model.window_grads(context_ids, weight, out_ids, touched.scratch)
        touched.pack(in_grads.numpy(), out_grads.numpy(), packed)
        return models.Rows(torch.from_numpy(packed), torch.stack([loss_sum, weight.sum()]))

    def apply(self, rows, lr):
        touched = cpu_kernel.touched_rows(self.model.vocab_size, self.model.embed_size)
        touched.apply(self.model.in_embed.weight.data.numpy(), self.model.out_embed.weight.data.numpy(),
                      rows.packed.numpy(), lr, models.MAX_SUMMED_GRADIENTS, rows.segments)


class TritonStep(WindowStep):
    """A GPU's form: Triton kernels (gpu_kernel), one row a window slot."""

    def __init__(self, model):
        super().__init__(model)
        import gpu_kernel  # only where Triton runs
        self.kernels = gpu_kernel

    def grads(self, context_ids, weight, out_ids):
        return models.Rows(*self.kernels.window_rows(self.model.in_embed.weight.data, self.model.out_embed.weight.data,
                                              context_ids.contiguous(), weight.contiguous(), out_ids.contiguous()))

    def apply(self, rows, lr):
        self.kernels.apply_rows(self.model.in_embed.weight.data, self.model.out_embed.weight.data, rows.packed,
                                rows.segments, lr, models.MAX_SUMMED_GRADIENTS)


class TensorStep(WindowStep):
    """The tensor ops of model.SGNS (a GPU without Triton, or --no-gpu-kernel); this process's
    steps run model.window_step itself."""

    def __call__(self, context_ids, weight, out_ids, lr):
        return self.model.window_step(context_ids, weight, out_ids, lr)

    def grads(self, context_ids, weight, out_ids):
        return self.model.window_rows(context_ids, weight, out_ids)

    def apply(self, rows, lr):
        self.model.apply_rows(rows, lr)


@functools.lru_cache(maxsize=None)
def _triton_usable(device):
    """Whether gpu_kernel (Triton) imports and runs on this CUDA device; asked once per device."""
    try:
        import gpu_kernel
    except Exception as err:  # noqa: BLE001 - no Triton, or one too old for the kernels' options
        print(f"warning: no usable Triton here ({err}); the GPU step runs as tensor ops")
        return False
    return gpu_kernel.usable(device)


class WindowStepGraph:
    """The window step over `steps` consecutive windows of per_step centers, captured once as a CUDA graph.

    An eager step launches a few (Triton) to a few dozen (tensor ops) small kernels, and at batch
    sizes of thousands of pairs a GPU finishes them faster than the host can launch them; a replay
    of a whole draw is one launch for data.STEPS_PER_DRAW steps.
    """

    def __init__(self, window_step, model, per_step, window, neg_count, steps=1):
        device = model.in_embed.weight.device
        n_windows = per_step * steps
        self.context_ids = torch.zeros((n_windows, 2 * window), dtype=torch.int64, device=device)
        self.weight = torch.zeros((n_windows, 2 * window), device=device)  # all padding: warm-up steps change nothing
        self.out_ids = torch.zeros((n_windows, neg_count + 1), dtype=torch.int64, device=device)
        self.lrs = torch.zeros(steps, device=device)

        def run():
            return torch.stack([window_step(self.context_ids[lo:lo + per_step], self.weight[lo:lo + per_step],
                                            self.out_ids[lo:lo + per_step], self.lrs[i])
                                for i, lo in enumerate(range(0, n_windows, per_step))])
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm up (cuBLAS handles, Triton's compiler, allocator) outside the capture
            for _ in range(3):
                run()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.stats = run()

    def __call__(self, context_ids, weight, out_ids, lrs):
        """Replays the steps on these windows (steps x per_step of them), step i at lrs[i]; returns
        their [loss sum, real pairs], steps x 2, on the device."""
        self.context_ids.copy_(context_ids)
        self.weight.copy_(weight)
        self.out_ids.copy_(out_ids)
        # pinned, so the copy waits for nothing (a pageable one would wait for the GPU to catch up)
        self.lrs.copy_(torch.tensor(lrs, dtype=torch.float32, pin_memory=True), non_blocking=True)
        self.graph.replay()
        return self.stats.clone()  # the next replay overwrites self.stats


class WindowGraphs:
    """The two captured shapes an epoch needs: a whole draw, and one step (for a draw cut short)."""

    def __init__(self, window_step, model, per_step, window, neg_count):
        self.whole_draw = WindowStepGraph(window_step, model, per_step, window, neg_count, data.STEPS_PER_DRAW)
        self.one_step = WindowStepGraph(window_step, model, per_step, window, neg_count)

    def draw(self, context_ids, weight, out_ids, lrs):
        return self.whole_draw(context_ids, weight, out_ids, lrs)

    def step(self, context_ids, weight, out_ids, lr):
        return self.one_step(context_ids, weight, out_ids, [lr])[0]


def window_graphs(window_step, model, args, device):
    """WindowGraphs when the run can use them (one process on a GPU, --cuda-graph), else None."""
    if not (args.cuda_graph and device.type == "cuda"):
        return None
    try:
        return WindowGraphs(window_step, model, centers_per_step(args.batch_size, args.window_size),
                            args.window_size, args.neg_sample_size)
    except RuntimeError as err:  # a driver or build without graph support: eager steps do the same work
        print(f"warning: CUDA graph capture failed ({str(err).splitlines()[0]}); training with eager steps")
        return None


# ---------------------------------------------------------------------------------------------
# Autograd steps on pairs

def autograd_epoch(engine, epoch):
    """One epoch of torch.optim steps on (center, context) pairs, each with its own negatives.

    The pairs are made on the host (pinned and copied asynchronously to a GPU), from blocks of
    whole sentences in a new order each epoch: an optimizer with moment estimates (Adam)
    otherwise follows whichever book of a corpus it read last.
    """
    strategy = engine.strategy
    kept_ids, starts, n_kept = engine.host_share(epoch.index, shuffled=True)
    epoch.n_steps = epoch_steps(n_kept, epoch.per_step, strategy.world_size)
    my_steps = min(epoch.n_steps, math.ceil(len(kept_ids) / epoch.per_step))  # a rank's last step may be empty
    stop = 0
    with strategy.uneven_steps(engine.train_model, epoch.n_steps, my_steps) as steps_to_run:
        for step in range(epoch.first_step, epoch.n_steps):
            if step >= steps_to_run:  # joined: nothing left to train
                epoch.report(step + 1, 0.0, 0, _step_words(engine, epoch, step), engine.lr(epoch, step))
                continue
            stop = strategy.before_step(step, epoch.first_step, epoch.signal())
            if stop:
                break
            batch = _pair_batch(engine, epoch, kept_ids, starts, step)
            lr = engine.lr(epoch, step)
            loss_sum, pairs, stop = _autograd_step(engine, batch, lr, epoch.signal())
            epoch.report(step + 1, loss_sum, pairs, _step_words(engine, epoch, step), lr)
            if stop:
                break
    return stop


def _step_words(engine, epoch, step):
    """Corpus words step `step` covers."""
    return epoch.words(len(engine.corpus), step + 1) - epoch.words(len(engine.corpus), step)


def _pair_batch(engine, epoch, kept_ids, starts, step):
    """Step `step`'s (center_ids, context_ids, neg_ids) on the model's device."""
    args = engine.args
    rng = data.epoch_rng(args.seed, epoch.index, 1 + engine.strategy.rank, step)
    lo, hi = step * epoch.per_step, min((step + 1) * epoch.per_step, len(kept_ids))
    center_ids, context_ids = data.window_pairs(kept_ids, starts, lo, hi, args.window_size, rng)
    neg_ids = engine.sampler.sample((len(center_ids), args.neg_sample_size), rng)
    batch = [torch.from_numpy(a) for a in (center_ids, context_ids, neg_ids)]
    if engine.device.type == "cuda":  # pinned host memory lets the copy overlap the previous step
        batch = [t.pin_memory() for t in batch]
    return [t.to(engine.device, non_blocking=True) for t in batch]


def _autograd_step(engine, batch, lr, signal):
    """One optimizer step on the batch's pairs; returns (loss summed over the pairs, pairs, agreed stop)."""
    strategy, optimizer = engine.strategy, engine.optimizer
    n_local = len(batch[0])
    n_global, loss_weight, stop = strategy.agree_on_batch(n_local, signal)
    # sgns under --multi-gpu trains by plain SGD on the summed loss, as word2vec does (its lr is
    # per pair); every other model steps on the mean loss
    summed = engine.args.multi_gpu and engine.args.model_name == "sgns"
    for group in optimizer.param_groups:
        group["lr"] = lr * n_local if summed else lr
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    if n_local or strategy.needs_every_backward:
        loss = engine.train_model(*(batch if n_local else _placeholder_batch(batch)))
        if loss.dim():  # DataParallel (distributed.data_parallel): the loss summed on each GPU
            loss = loss.sum() / n_local
        (loss * loss_weight).backward()
        loss_sum = loss.detach() * n_local
    strategy.reduce_gradients(engine.model, n_local)
    if n_global:
        optimizer.step()
    return loss_sum, n_local, stop


def _placeholder_batch(batch):
    """A one-pair batch of valid ids, for a rank with no pairs whose backward must still run."""
    return [t[:0].new_zeros((1,) + t.shape[1:]) for t in batch]
