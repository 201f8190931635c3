"""Training on several GPUs of one process (DataParallel) or on several processes/machines (torch.distributed).

trainer.py calls: add_arguments / check_arguments (flags), session (init and always destroy the process
group), is_main, check_same_corpus, broadcast_parameters, data_parallel, start_together, centers_per_step,
and dist_epoch or dist_kernel_epoch (the engines of distributed runs). Sync mode sums every rank's gradient rows each
step (the touched rows swapped point to point on the CPU, all-gathered on GPUs; never a dense
all-reduce of the V x d tables); async mode is local SGD whose changes are exchanged in a
non-blocking all-reduce every --sync-interval steps (Averager).
"""
import contextlib
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import cpu_kernel
import data
import model as models

INIT_SCHEMES = ("tcp://", "file://", "env://")
# --async's default interval: 50 steps, and no fewer global pairs than 50 steps of the default
# batch (4096). Each exchange sends both whole tables, which cost as much as the training between
# two exchanges at batch 1024 and 50 steps (bench/RESULTS.md); tied to text, the interval is the
# one bench_async_quality measured the quality of, whatever the batch.
MIN_SYNC_STEPS, MIN_SYNC_PAIRS = 50, 50 * 4096
# Share of an --async epoch spent at sync points above which rank 0 suggests a longer interval
# (a large vocabulary: every exchange passes over and sends both whole tables; bench/RESULTS.md)
EXCHANGE_HINT_SHARE = 0.25
_INTERVAL_HINTED = False  # said once a run


class DistributedFailure(Exception):
    """A rank died, could not connect or timed out; reported in one line, exit 1."""


@dataclass
class World:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    init_method: str
    timeout: float


WORLD = None  # set by check_arguments for --multi-node runs


def add_arguments(parser):
    g = parser.add_argument_group("several GPUs and machines")
    g.add_argument("--multi-gpu", action="store_true",
                   help="one process, the model replicated on --num-gpu GPUs with nn.DataParallel (plain SGD)")
    g.add_argument("--num-gpu", type=int, default=None, help="GPUs used by --multi-gpu (default: all visible)")
    g.add_argument("--multi-node", action="store_true",
                   help="one process per rank with torch.distributed (launch one per GPU/machine, or use torchrun)")
    g.add_argument("--backend", default=None, choices=["gloo", "nccl"],
                   help="torch.distributed backend (default: nccl with --device cuda, else gloo)")
    g.add_argument("--init-method", default=None,
                   help="how ranks find each other: tcp://HOST:PORT, file:///shared/path or env:// "
                        "(default: env:// when torchrun's RANK and WORLD_SIZE are set)")
    g.add_argument("--rank", type=int, default=None, help="this process's rank, 0..world-size-1 (default: $RANK)")
    g.add_argument("--world-size", type=int, default=None, help="number of processes (default: $WORLD_SIZE)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--sync", dest="dist_mode", action="store_const", const="sync", default="sync",
                      help="every step sums all ranks' gradients: ranks hold identical parameters (default)")
    mode.add_argument("--async", dest="dist_mode", action="store_const", const="async",
                      help="local SGD; the ranks' changes averaged in the background every --sync-interval steps")
    g.add_argument("--sync-interval", type=int, default=None,
                   help="steps between two averagings in --async mode (the CPU kernel averages after as many "
                        f"centers as that many steps of --batch-size pairs hold). Default: {MIN_SYNC_STEPS} steps, "
                        f"and at least {MIN_SYNC_PAIRS:,} pairs of global batch (more steps below batch "
                        f"{MIN_SYNC_PAIRS // MIN_SYNC_STEPS}), so that a small batch does not exchange the whole "
                        "tables after a few milliseconds of training")
    g.add_argument("--block-momentum", type=float, default=0.0,
                   help="--async: momentum of the averaged changes, in [0, 1) (BMUF). 0.5 gives back what "
                        "averaging takes from 2 ranks: better word similarity, higher PIP loss (README); "
                        "7/8 diverged with 8 ranks")
    g.add_argument("--dist-timeout", type=float, default=120.0,
                   help="seconds a rank waits for the others (connecting, each collective) before failing")


def check_arguments(parser, args):
    """Validate the flags (parser.error: one line, exit 2) and resolve the world from flags or torchrun's env."""
    global WORLD
    WORLD = None
    if args.sync_interval is None:
        # a batch size of 0 is refused later, with the other sizes
        args.sync_interval = max(MIN_SYNC_STEPS, math.ceil(MIN_SYNC_PAIRS / max(1, args.batch_size)))
    if args.sync_interval <= 0 or not args.dist_timeout > 0:
        parser.error("--sync-interval and --dist-timeout must be positive")
    if not 0 <= args.block_momentum < 1:
        parser.error(f"--block-momentum {args.block_momentum}: must be in [0, 1)")
    if args.block_momentum and args.dist_mode != "async":
        parser.error("--block-momentum goes with --multi-node --async")
    if args.multi_gpu and args.multi_node:
        parser.error("--multi-gpu and --multi-node exclude each other: for several GPUs with torch.distributed, "
                     "run one --multi-node process per GPU (torchrun --nproc-per-node N)")
    if args.multi_gpu:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        wanted = args.num_gpu if args.num_gpu is not None else available
        if available == 0 or not 1 <= wanted <= available:
            parser.error(f"--multi-gpu: {wanted if args.num_gpu is not None else 'some'} CUDA device(s) asked for, "
                         f"{available} visible")
        if args.optimizer != "sgd":
            parser.error("--multi-gpu trains with plain SGD (DataParallel cannot reduce sparse gradients); "
                         "use --multi-node, one process per GPU, for other optimizers")
        if args.engine == "kernel":
            parser.error("--multi-gpu runs the torch engine, not --engine kernel")
        args.num_gpu, args.engine = wanted, "torch"
        if args.device == "cpu":
            args.device = "cuda:0"
    elif args.num_gpu is not None:
        parser.error("--num-gpu goes with --multi-gpu")
    if not args.multi_node:
        if args.init_method or args.rank is not None or args.world_size is not None or args.backend \
                or args.dist_mode == "async":
            parser.error("--backend, --init-method, --rank, --world-size and --async go with --multi-node")
        return
    init_method = args.init_method
    if init_method is None and args.rank is None and args.world_size is None and "RANK" in os.environ:
        init_method = "env://"  # launched by torchrun (or another launcher that sets its variables)
    if init_method is None:
        parser.error("--multi-node needs --init-method, --rank and --world-size, or torchrun's environment "
                     "(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
    if not init_method.startswith(INIT_SCHEMES):
        parser.error(f"--init-method {init_method}: not a torch.distributed init method; use one of "
                     f"{', '.join(s + '...' for s in INIT_SCHEMES)}")
    try:
        rank = args.rank if args.rank is not None else int(os.environ["RANK"])
        world_size = args.world_size if args.world_size is not None else int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        parser.error("--multi-node: give --rank and --world-size (or set RANK and WORLD_SIZE, as torchrun does)")
    if init_method.startswith("env://") and not {"MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys():
        parser.error("--init-method env:// needs MASTER_ADDR and MASTER_PORT in the environment (torchrun sets them)")
    if not 0 <= rank < world_size:
        parser.error(f"--rank {rank} must be in 0..{world_size - 1} (--world-size {world_size})")
    backend = args.backend or ("nccl" if args.device.startswith("cuda") else "gloo")
    if backend == "nccl":
        if not dist.is_nccl_available() or not torch.cuda.is_available():
            parser.error("--backend nccl needs CUDA GPUs and a PyTorch built with NCCL; use --backend gloo on CPU")
        if not args.device.startswith("cuda"):
            parser.error("--backend nccl moves GPU tensors only: add --device cuda")
    if args.dist_mode == "sync":  # every step exchanges gradients: batched steps only
        if args.engine == "kernel":
            parser.error("--multi-node --sync runs the torch engine (batched steps); --engine kernel goes with --async")
        args.engine = "torch"
    if args.device == "cuda":  # one GPU per process: torchrun's LOCAL_RANK, else rank modulo GPUs here
        args.device = f"cuda:{local_rank % torch.cuda.device_count()}"
    WORLD = World(rank, world_size, local_rank, backend, init_method, args.dist_timeout)


@contextlib.contextmanager
def session(args):
    """Join the process group for the run and always leave it; distributed failures become one line."""
    if WORLD is None:
        yield
        return
    silenced = finished = None
    try:
        join_group(WORLD.backend, WORLD.init_method, WORLD.rank, WORLD.world_size, WORLD.timeout)
        if WORLD.backend == "gloo" and args.dist_mode == "sync":
            idle_gloo_io_thread()
        if WORLD.backend == "gloo":  # names the ranks that never showed up, instead of a bare timeout
            dist.monitored_barrier(timeout=timedelta(seconds=WORLD.timeout))
        if WORLD.rank != 0:  # one voice: rank 0 prints and shows progress; errors still reach stderr
            silenced, sys.stdout = sys.stdout, open(os.devnull, "w")
            args.quiet = True
        yield
        finished = leave_together()
    except dist.DistError as err:
        raise DistributedFailure(_describe(err)) from err
    except RuntimeError as err:  # Gloo/NCCL report dead peers and timeouts as plain RuntimeErrors too
        if not _looks_distributed(err):
            raise
        raise DistributedFailure(_describe(err)) from err
    finally:
        if silenced is not None:
            sys.stdout.close()
            sys.stdout = silenced
        if dist.is_initialized():
            dist.destroy_process_group()
        del finished  # after the group: see leave_together


def join_group(backend, init_method, rank, world_size, timeout):
    """dist.init_process_group, after importing torch._dynamo (1 s). torch.optim imports it on first
    use, and imported while a group exists (torch 2.13) it keeps the group alive past
    destroy_process_group: the group's Gloo threads then outlive the interpreter (see leave_together)."""
    import torch._dynamo  # noqa: F401
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout))


def idle_gloo_io_thread():
    """Linux: run the Gloo group's I/O thread (gloo_tcp_loop) under SCHED_IDLE, for --sync on the
    CPU; returns how many threads were moved (0 where /proc or SCHED_IDLE is missing).

    When data comes in while the main thread holds the connection's lock, the I/O thread only
    try-locks and waits on epoll again, which answers at once: it spins. With every core busy, it
    took the core of the lock holder it waited for, for up to a scheduler slice: 3 ms here, in a
    step of 3 ms (2 ranks on 2 cores, batch 8192, d=50). Under SCHED_IDLE it runs only on a core
    nobody else wants, which a sync step always leaves when it waits for the swap; sync steps got
    1.1-1.8x faster (bench/RESULTS.md). Not for --async: its exchange must progress while every
    core trains."""
    try:
        threads = os.listdir("/proc/self/task")
        policy = os.SCHED_IDLE
    except (OSError, AttributeError):
        return 0
    moved = 0
    for tid in threads:
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                if comm.read().strip() == "gloo_tcp_loop":
                    os.sched_setscheduler(int(tid), policy, os.sched_param(0))
                    moved += 1
        except OSError:  # the thread ended, or the policy is not allowed here: the run is only slower
            pass
    return moved


def leave_together():
    """A barrier before the group is destroyed (Gloo can abort a rank whose peer closed its sockets
    first); returns the barrier's Work, for the caller to drop after destroy_process_group.

    Gloo's barrier holds the collectives still running when it was called, and their tensors
    belong to Python. Dropped by a Gloo thread while the interpreter shuts down, they abort the
    process ("terminate called without an active exception": the thread exits as it takes the
    GIL, inside a destructor). Held here, they die in the main thread. Without this and
    join_group, a rank aborted after the last step in 2-3% of short 3-rank runs."""
    finished = _barrier(async_op=True)
    finished.wait()
    return finished


def _barrier(async_op=False):
    """dist.barrier, on this rank's GPU under NCCL (named: without it, NCCL guesses, with a warning)."""
    on_gpu = dist.get_backend() == "nccl"
    return dist.barrier(async_op=async_op, device_ids=[torch.cuda.current_device()] if on_gpu else None)


def start_together():
    """Wait until every rank is ready to train. Ranks finish their start-up (imports, compiles,
    caches) at different times; without this wait, the first exchange of the first epoch held it,
    and rank 0's first epoch time with it: up to 0.2 s of a 0.4 s epoch on 2 cores here."""
    if active():
        _barrier()


def _looks_distributed(err):
    text = str(err).lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket",
                                         "store", "rendezvous", "rank"))


def _describe(err):
    first = (str(err).strip().splitlines() or [err.__class__.__name__])[0]
    return (f"rank {WORLD.rank} of {WORLD.world_size}: another rank died, closed its connection or did not answer "
            f"within --dist-timeout {WORLD.timeout:g} s ({err.__class__.__name__}: {first[:300]})")


def active():
    return WORLD is not None and dist.is_initialized()


def is_main():
    """Only rank 0 logs, evaluates and writes files."""
    return not active() or dist.get_rank() == 0


class NullWriter:
    """TensorBoard writer of the ranks that do not log."""

    def add_scalar(self, *a, **k):
        pass

    def add_embedding(self, *a, **k):
        pass

    def close(self):
        pass


def check_same_corpus(corpus_hash, vocab_size):
    """Every rank must have built the same vocabulary, else the rows they exchange mean different words."""
    if not active():
        return
    mine = torch.tensor(list(bytes.fromhex(corpus_hash)[:16]) + [vocab_size], dtype=torch.int64)
    everyone = _all_gather_equal(mine.to(_comm_device()))
    for rank, theirs in enumerate(everyone):
        if not torch.equal(theirs.cpu(), mine):
            raise DistributedFailure(f"rank {rank} built another corpus than rank {dist.get_rank()}: every rank "
                                     "needs the same corpus files and preprocessing options")


def broadcast_parameters(model):
    """Start every rank from rank 0's parameters (fresh, --load-model or --resume alike)."""
    if active():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)


class SummedLoss(torch.nn.Module):
    """The loss summed over this replica's pairs, as a 1-element vector DataParallel can gather."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, center_ids, context_ids, neg_ids):
        return (self.model(center_ids, context_ids, neg_ids) * len(center_ids)).reshape(1)


def data_parallel(model, num_gpu):
    """The model replicated on GPUs 0..num_gpu-1: each batch is split between them, the gradients
    are summed on GPU 0. torch_epoch divides the gathered sums by the batch size (the exact mean)."""
    return torch.nn.DataParallel(SummedLoss(model), device_ids=list(range(num_gpu)))


def _comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if WORLD and WORLD.backend == "nccl" \
        else torch.device("cpu")


# ---------------------------------------------------------------------------------------------
# Sharding: every rank derives the same block permutation, then takes its equal slice of tokens

def shard(kept_ids, starts, seed, epoch, rank, world_size):
    """This rank's part of the (subsampled) epoch: token ids and sentence starts within them.

    Blocks of whole sentences are permuted with a seed shared by all ranks (a new order each
    epoch, data.shuffle_sentence_blocks), the permuted stream is cut into world_size slices of
    equal token count (+-1), so every rank makes the same number of steps.
    """
    n = len(kept_ids)
    if n == 0:
        return kept_ids, np.zeros(1, dtype=np.int64)
    stream, stream_starts = data.shuffle_sentence_blocks(kept_ids, starts, seed, epoch)
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    mine = stream_starts[(stream_starts >= lo) & (stream_starts < hi)] - lo
    return stream[lo:hi], np.unique(np.concatenate([[0], mine])).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Collectives on variable-length row lists

def _all_gather_equal(tensor):
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor)
    return parts


def _gather_rows(rows, values, counts):
    """All ranks' (rows, values), concatenated in rank order; counts[r] = rows rank r sends (pad to the max)."""
    longest = int(max(counts))
    pad = longest - len(rows)
    rows = torch.cat([rows, rows.new_zeros(pad)])
    values = torch.cat([values, values.new_zeros((pad,) + values.shape[1:])])
    all_rows = _all_gather_equal(rows)
    all_values = _all_gather_equal(values)
    return (torch.cat([r[:int(c)] for r, c in zip(all_rows, counts)]),
            torch.cat([v[:int(c)] for v, c in zip(all_values, counts)]))


def _start_header(*numbers):
    """Start the all-gather of every rank's small per-step numbers (row count, loss, pairs, stop
    signal); returns a function that waits for it and gives them as a world_size x n table."""
    mine = torch.tensor(numbers, dtype=torch.float64, device=_comm_device())
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    work = dist.all_gather(parts, mine, async_op=True)

    def table():
        work.wait()
        return torch.stack(parts).cpu()
    return table


def _ids_as_floats(ids, out):
    """Write row ids into two float32 columns of out (both exact in float32), so that one
    message carries ids and gradients together (the packing of cpu_kernel.pack_rows)."""
    out[:, 0] = torch.div(ids, cpu_kernel.KEY_SPLIT, rounding_mode="floor")
    out[:, 1] = torch.remainder(ids, cpu_kernel.KEY_SPLIT)


def _floats_as_ids(columns):
    return columns[:, 0].long() * cpu_kernel.KEY_SPLIT + columns[:, 1].long()


def sync_window_step(model, context_ids, weight, out_ids, lr, max_windows, stop_signal=0):
    """One synchronous window step (model.window_step) over all ranks' windows together.

    The loss is a sum over pairs, so summing every rank's gradients gives one single-process
    step on the concatenated global batch; each row is then scaled as window_step scales it,
    by its count over all ranks (model.row_damping). Only touched rows travel, each rank's
    gradient summed per row. max_windows: the most windows a rank's step holds. On the CPU
    compiled loops do the bookkeeping and the rows travel point to point
    (_sync_window_step_compiled); on GPUs tensor ops and an all-gather
    (_sync_window_step_tensors). Returns (global loss sum, global pairs, agreed stop signal).
    """
    if context_ids.device.type == "cpu":
        return _sync_window_step_compiled(model, context_ids, weight, out_ids, lr, max_windows, stop_signal)
    return _sync_window_step_tensors(model, context_ids, weight, out_ids, lr, stop_signal)


def _sync_window_step_compiled(model, context_ids, weight, out_ids, lr, max_windows, stop_signal=0):
    """sync_window_step on the CPU, in one exchange. A buffer holds a region per rank: a first
    row [rows, pairs, stop signal, loss], then room for as many rows as a rank's step can touch
    (max_windows x (context slots + out slots), at most 2V). Each rank posts the receives of the
    others' regions, numbers its distinct rows (cpu_kernel.number_rows), computes its gradients,
    packs them into its region (cpu_kernel.pack_rows: [gradient | key | key | uses]) and sends
    the part it filled to every other rank; every rank then applies the rows of all regions in
    rank order (cpu_kernel.apply_rows), so all ranks compute the same bits. Sending the row
    counts first, in an all-gather that travelled while the gradients were computed, cost a
    second round trip: 0.2-0.3 ms a step here (bench/RESULTS.md)."""
    vocab, dim = model.vocab_size, model.embed_size
    me, world_size = dist.get_rank(), dist.get_world_size()
    region = 1 + min(2 * vocab, max_windows * (context_ids.shape[1] + out_ids.shape[1]))
    rows = cpu_kernel.touched_rows(vocab, dim)
    everyone = rows.buffer(world_size * region)
    others = [rank for rank in range(world_size) if rank != me]
    receives = [dist.irecv(torch.from_numpy(everyone[rank * region:(rank + 1) * region]), rank) for rank in others]
    n_rows = rows.number(context_ids.numpy(), weight.numpy(), out_ids.numpy())
    loss_sum, _, in_grads, _, out_grads = model.window_grads(context_ids, weight, out_ids, rows.scratch)
    mine = everyone[me * region:me * region + 1 + n_rows]
    rows.pack(in_grads.numpy(), out_grads.numpy(), mine[1:])
    mine[0] = 0.0
    mine[0, :4] = n_rows, float(weight.sum(dtype=torch.float64)), stop_signal, float(loss_sum)
    sends = [dist.isend(torch.from_numpy(mine), rank) for rank in others]
    for work in receives + sends:
        work.wait()
    firsts = everyone[::region]  # each region's first row
    starts = np.arange(world_size, dtype=np.int64) * region + 1
    segments = np.stack([starts, starts + firsts[:, 0].astype(np.int64)], 1)
    rows.apply(model.in_embed.weight.data.numpy(), model.out_embed.weight.data.numpy(), everyone, lr,
               models.MAX_SUMMED_GRADIENTS, segments)
    return float(firsts[:, 3].sum(dtype=np.float64)), int(firsts[:, 1].sum()), int(firsts[:, 2].max())


def _sync_window_step_tensors(model, context_ids, weight, out_ids, lr, stop_signal=0):
    """sync_window_step with tensor ops (GPUs; NCCL's all-gather). Each rank sums its gradients per
    row into one buffer of rows [gradient | key | key | uses] (keys 0..V-1 for in_embed rows, V..2V-1
    for out_embed rows), plus a last row holding its loss and pairs, and all ranks all-gather the
    buffers, padded to the longest. The row counts and stop signals travel before, in a tiny
    all-gather that runs while the buffer is filled. The host waits for the GPU twice a step: for
    the number of distinct rows and for the row counts. It had waited 4 + world size times, and
    one GPU's epoch took 1.18-1.51 s against 1.08-1.35 s now (alternated runs): the step is bound
    by launching its ~45 kernels (bench/RESULTS.md). Returns (global loss sum and pairs, on the
    device; agreed stop signal).
    """
    vocab, dim = model.vocab_size, model.embed_size
    assert 2 * vocab < 2 ** 36, "row ids must survive the float32 packing"
    loss_sum, in_rows, in_grads, out_rows, out_grads = model.window_grads(context_ids, weight, out_ids)
    keys, where = torch.unique(torch.cat([in_rows, out_rows + vocab]), return_inverse=True)
    n_rows, n_in_slots = len(keys), len(in_rows)
    header_table = _start_header(n_rows, stop_signal)
    # Room for every row this step could touch and the stats row; rows past them are padding nobody reads.
    buffer = in_grads.new_empty(n_in_slots + len(out_rows) + 1, dim + 3)
    mine = buffer[:n_rows + 1]
    mine.zero_()
    mine[:n_rows, :dim].index_add_(0, where[:n_in_slots], in_grads)
    mine[:n_rows, :dim].index_add_(0, where[n_in_slots:], out_grads)
    _ids_as_floats(keys, mine[:n_rows, dim:dim + 2])
    mine[:n_rows, dim + 2].index_add_(0, where[:n_in_slots], weight.reshape(-1))  # real pairs behind each in row
    mine[:n_rows, dim + 2].index_add_(0, where[n_in_slots:], torch.ones_like(out_grads[:, 0]))
    mine[n_rows, :2] = torch.stack([loss_sum, weight.sum()])
    header = header_table()  # normally arrived while the buffer filled
    counts = header[:, 0].long().tolist()
    n_max = max(counts) + 1  # every rank sends as many rows as the longest, and its stats row
    if n_max > len(buffer):  # a rank with more windows (the last, shorter step): pad with a copy
        buffer = torch.cat([mine, buffer.new_empty(n_max - len(mine), dim + 3)])
    parts = _all_gather_equal(buffer[:n_max])
    rows = torch.cat([part[:n] for part, n in zip(parts, counts)])  # rank order: every rank adds the same sums
    stats = torch.stack([part[n, :2] for part, n in zip(parts, counts)]).sum(0)
    all_keys, uses = _floats_as_ids(rows[:, dim:dim + 2]), rows[:, dim + 2]
    grads = rows[:, :dim] * model.row_damping(all_keys, uses, 2 * vocab)  # scaled by the global counts, as window_step
    is_in = (all_keys < vocab).unsqueeze(1)
    # in rows into in_embed, out rows into out_embed: the other table's rows add zeros (no host sync to split them)
    model.apply_sparse_grads(all_keys.clamp(max=vocab - 1), grads * is_in, (all_keys - vocab).clamp(min=0),
                             grads * ~is_in, lr)
    return stats[0], stats[1], int(header[:, 1].max())


def _sparse_params(model):
    """Parameters whose gradient is sparse (nn.Embedding(sparse=True)): decided by the model, not by the batch."""
    return {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse}


def sync_gradients(model, n_local, stop_signal=0):
    """After backward() of the local mean loss: every gradient becomes the mean over the global batch.

    Sparse gradients travel as coalesced rows (all-gather), dense ones are all-reduced; each
    rank weighs its mean by its share of the global batch. A rank whose batch was empty
    (no backward) takes part with empty gradients. Returns (global pairs, agreed stop signal).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    sparse_ids = _sparse_params(model)
    sparse = [p for p in params if id(p) in sparse_ids]
    sparse_grads = [p.grad.coalesce() if p.grad is not None else
                    torch.sparse_coo_tensor(torch.zeros((1, 0), dtype=torch.int64, device=p.device),
                                            p.new_zeros((0,) + p.shape[1:]), p.shape) for p in sparse]
    header = _start_header(n_local, stop_signal, *[g.indices().shape[1] for g in sparse_grads])()
    n_global = float(header[:, 0].sum())
    for column, (p, g) in enumerate(zip(sparse, sparse_grads), start=2):
        rows, values = _gather_rows(g.indices()[0], g.values() * n_local, header[:, column].long().tolist())
        p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values / max(n_global, 1.0), p.shape).coalesce()
    for p in params:
        if id(p) not in sparse_ids:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.mul_(n_local / max(n_global, 1.0))
            dist.all_reduce(p.grad)
    return int(n_global), int(header[:, 1].max())


class Averager:
    """--async: local SGD whose exchanges run in a non-blocking all-reduce, applied one interval later.

    All ranks share a consensus copy of the parameters. At sync point k each rank sends what
    it changed since sync point k-1 (with a flag per row: did it change the row; and its stop
    signal) in a background all-reduce and keeps training. At sync point k+1 it waits for
    that all-reduce (normally long done) and moves the consensus by
        momentum = block_momentum * momentum + (each row's mean change over the ranks that changed it)
    and its own parameters become the new consensus plus its progress since sync point k. So a
    rank never misses another's updates by more than 2 intervals, and what it applies is at
    most one interval old.

    The changes travel as bfloat16: half the bytes of float32, and what the rounding leaves out
    (at most 1/256 of a change) is kept and sent with the rank's next changes (error feedback),
    so nothing a rank learns is lost, only delayed by one exchange; the epoch's last leftovers
    are dropped. Between 2 Gloo ranks here, all-reducing 1.9M changes a rank (two 4,665 x 200
    tables) took 4.6-7.3 ms of CPU in float32, 3.2-4.1 ms in bfloat16 (bench/bench_distributed.py).

    A plain average of the ranks' parameters keeps 1/world-size of what each rank learnt: with
    2 ranks, every change made on half the text is halved. The row-wise mean gives a row that
    one rank alone changed (a rare word's vector) that rank's whole change. The block momentum
    (Chen & Huo 2016, "BMUF"; --block-momentum, default 0) gives back, over the next exchanges,
    what averaging takes from the rows all ranks changed. In a simple model of one row (each
    rank's interval closes a fraction a of its gap to the row's target; the consensus hears of
    it one exchange later) the gap follows z^2 - (1 + m) z + (m + a) = 0 from exchange to
    exchange: it shrinks while m + a < 1, so a large momentum diverges (bench/RESULTS.md).
    """

    def __init__(self, model, block_momentum=0.0):
        self.params = list(model.parameters())  # equal on all ranks here: every epoch starts from a consensus
        self.rows = [p.shape[0] if p.dim() else 1 for p in self.params]
        n = sum(p.numel() for p in self.params)
        self.consensus = torch.cat([p.data.reshape(-1) for p in self.params])
        self.sent_from = self.consensus.clone()  # this rank's parameters when it last sent its changes
        self.unsent = self.consensus.new_zeros(n, dtype=torch.bfloat16)  # what rounding kept out of the last send
        # changes | rows changed | stop signal
        self.buffer = self.consensus.new_empty(n + sum(self.rows) + 1, dtype=torch.bfloat16)
        self.block_momentum = block_momentum  # each epoch (and each resumed one) starts without momentum
        self.momentum = torch.zeros_like(self.consensus) if block_momentum else None
        self.no_momentum = self.consensus.new_zeros(0, 1)  # stands for momentum when there is none
        self.work = None
        self.sent = 0
        self.started, self.exchange_s = time.perf_counter(), 0.0  # for exchange_share

    def exchange_share(self):
        """The share of the time since this epoch began spent at sync points (passes and waits)."""
        return self.exchange_s / max(time.perf_counter() - self.started, 1e-9)

    def _slices(self):
        """Each parameter with its slice of the flat copies and its slice of the changed-row flags."""
        offset, flag_offset = 0, self.consensus.numel()
        for p, rows in zip(self.params, self.rows):
            yield p, slice(offset, offset + p.numel()), slice(flag_offset, flag_offset + rows)
            offset, flag_offset = offset + p.numel(), flag_offset + rows

    def _exchange(self, apply_received, send):
        """One pass over every parameter: move the consensus by the all-reduce just received, then
        put this rank's changes since it last sent into the buffer and rebase its parameters on the
        consensus. On the CPU a compiled loop does it (cpu_kernel.exchange_rows): the 8 tensor
        passes it replaced took 18 ms an exchange for two 21,000 x 200 tables, all memory traffic."""
        for p, flat, flags in self._slices():
            rows = flags.stop - flags.start
            views = [t.view(rows, -1) for t in (p.data, self.sent_from[flat], self.consensus[flat],
                                                self.buffer[flat], self.unsent[flat])]
            momentum = self.momentum[flat].view(rows, -1) if self.block_momentum else self.no_momentum
            views += [self.buffer[flags], momentum]
            if p.device.type == "cpu":
                cpu_kernel.exchange_rows(*(_as_numpy(v) for v in views), np.float32(self.block_momentum),
                                         apply_received, send)
            else:
                exchange_rows(*views, self.block_momentum, apply_received, send)

    def _start(self, stop_signal):
        self.buffer[-1] = float(stop_signal)
        self.sent = stop_signal
        self.work = dist.all_reduce(self.buffer, async_op=True)

    def _wait(self):
        """Wait for the all-reduce; True if some rank must stop (a sum of signals: not which)."""
        self.work.wait()
        self.work = None
        return self.buffer[-1] > 0

    def sync_point(self, stop_signal):
        """Apply the previous all-reduce, start the next; returns the stop signal agreed at the previous one."""
        began = time.perf_counter()
        agreed = 0
        received = self.work is not None
        if received and self._wait():
            agreed = self.sent or int(signal.SIGTERM)
        self._exchange(received, send=True)
        self._start(stop_signal)
        self.exchange_s += time.perf_counter() - began
        return agreed

    def finish(self):
        """Blocking: apply what is pending, exchange the rest, and set every rank to the same consensus."""
        began = time.perf_counter()
        received = self.work is not None
        if received:
            self._wait()
        self._exchange(received, send=True)
        self._start(0)
        self._wait()
        self._exchange(True, send=False)
        for p, flat, _ in self._slices():  # a copy, not an update: bit-identical on every rank
            p.data.copy_(self.consensus[flat].view_as(p))
        self.exchange_s += time.perf_counter() - began


def interval_hint(share, interval):
    """What rank 0 says when an --async epoch spent share of its time at sync points, or None."""
    if share < EXCHANGE_HINT_SHARE:
        return None
    return (f"note: this epoch spent {share:.0%} of its time exchanging with the other ranks (all the parameters "
            f"every --sync-interval {interval} steps); a larger --sync-interval trains faster, at some cost in word "
            "similarity (README: Several GPUs and machines)")


def _say_interval_hint(averager, args):
    """Rank 0 prints interval_hint once a run, after the first epoch that deserves it."""
    global _INTERVAL_HINTED
    message = interval_hint(averager.exchange_share(), args.sync_interval)
    if message and not _INTERVAL_HINTED and is_main():
        _INTERVAL_HINTED = True
        tqdm.write(message)  # above the progress bar, not through it


def _as_numpy(tensor):
    """A CPU tensor as a numpy array; bfloat16, which numpy lacks, as its bits (uint16)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    return tensor.numpy()


def exchange_rows(values, sent_from, consensus, changes, unsent, flags, momentum, block_momentum, apply_received,
                  send):
    """Averager's pass over one parameter as rows x width views (cpu_kernel.exchange_rows is the same,
    compiled). changes, unsent and flags are bfloat16. apply_received: changes holds the ranks'
    summed changes and flags how many ranks changed each row; the consensus moves by the rows' mean
    change through the block momentum. send: changes gets this rank's progress since sent_from plus
    what the last rounding left out (unsent), rounded, and unsent what this rounding leaves out;
    flags marks the rows with progress; values and sent_from become the consensus plus all this
    rank learnt that the consensus has not heard of (exact for untouched rows: it is 0)."""
    if apply_received:
        step = changes.float().div_(flags.float().clamp(min=1.0).unsqueeze(1))
        if block_momentum:
            step = momentum.mul_(block_momentum).add_(step)
        consensus += step
    if send:
        progress = values - sent_from
        flags.copy_((progress.amax(dim=1) != 0) | (progress.amin(dim=1) != 0))  # 9x faster than any()
        total = progress.add_(unsent.float())
        changes.copy_(total)
        unsent.copy_(total - changes.float())
        torch.add(consensus, total, out=values)
        sent_from.copy_(values)


# ---------------------------------------------------------------------------------------------

def centers_per_step(batch_size, window_size):
    """Centers in one rank's step: the global batch of pairs split across ranks (a center has about
    W+1 real pairs). The whole batch outside a --multi-node run."""
    world_size = dist.get_world_size() if active() else 1
    return max(1, batch_size // world_size // (window_size + 1))


def dist_epoch(model, optimizer, corpus, args, epoch, position, batches, step, lr_at, stop_signal):
    """One epoch of a --multi-node run on this rank's shard; returns the agreed stop signal or 0.

    All ranks make the same number of steps (their shards differ by at most one token) and
    draw windows and negatives from a generator seeded by (seed, epoch, rank, first step of
    the draw), so a run stopped at step i resumes exactly there. Plain SGD steps on whole
    windows, as a single process does (data.WindowBatches, model.window_step); other
    optimizers step on the pairs of those windows, by autograd. stop_signal() is this rank's
    pending SIGINT/SIGTERM: ranks stop together at a step they agree on (sync: the next
    step; async: the next sync point but one).
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    kept_ids, kept_sentence = (t.cpu().numpy() for t in batches.subsample(args.seed, epoch))  # equal on all ranks
    starts = np.flatnonzero(np.diff(kept_sentence, prepend=-1))  # where each kept sentence begins
    ids, local_starts = shard(kept_ids, starts, args.seed, epoch, rank, world_size)
    device = batches.device
    local_ids = torch.from_numpy(ids.astype(np.int64)).to(device)
    sentence_lengths = np.diff(np.append(local_starts, len(ids)))
    local_sentence = torch.from_numpy(np.repeat(np.arange(len(local_starts)), sentence_lengths)).to(device)
    per_step = centers_per_step(args.batch_size, args.window_size)
    n_steps = max(1, math.ceil(math.ceil(len(kept_ids) / world_size) / per_step))
    averager = Averager(model, args.block_momentum) if args.dist_mode == "async" else None
    words_per_step = len(corpus) / n_steps  # all ranks together go through the corpus once an epoch
    first = position.get("step", 0)
    for i in range(first, n_steps):
        if i == first or i % data.STEPS_PER_DRAW == 0:  # windows drawn for STEPS_PER_DRAW steps at a time
            draw_first = i - i % data.STEPS_PER_DRAW
            lo = min(draw_first * per_step, len(ids))
            hi = min(lo + per_step * data.STEPS_PER_DRAW, len(ids))
            drawn = batches.windows(local_ids, local_sentence, lo, hi - lo,
                                    batches.seeded(args.seed, epoch, 1 + rank, draw_first))
        offset = (i - draw_first) * per_step
        window = [t[offset:offset + per_step] for t in drawn]
        lr = lr_at(args, (epoch + i / n_steps) / args.epochs)
        stop = 0
        if averager is not None and (i - first) % args.sync_interval == 0 and i > first:
            stop = averager.sync_point(stop_signal())
        if optimizer is None and averager is None:  # SGD summed over ranks
            loss_sum, pairs, stop = sync_window_step(model, *window, lr, per_step, stop_signal())
        elif optimizer is None:
            loss_sum, pairs = model.window_step(*window, lr)
        else:
            loss_sum, pairs, sync_stop = _autograd_step(model, optimizer, *pairs_of_windows(*window), lr,
                                                        averager is None, stop_signal())
            stop = max(stop, sync_stop)
        step(loss_sum, pairs, words_per_step, lr, {"step": i + 1})
        if stop:
            if averager is not None:
                averager.finish()
            return stop
    if averager is not None:
        averager.finish()  # every epoch ends with identical parameters: PIP loss and checkpoints see the consensus
        _say_interval_hint(averager, args)
    return 0


def dist_kernel_epoch(model, corpus, args, epoch, position, sampler, keep_prob, step, lr_at, stop_signal):
    """One --async epoch of this rank's shard on the compiled CPU kernel (cpu_kernel); returns
    the agreed stop signal or 0.

    The kernel trains pair by pair, as one process does, between two averagings. A rank
    averages after as many centers as --sync-interval torch-engine steps would take
    (--batch-size / world size / (window + 1) centers a step), so both engines average after
    the same amount of text. position["step"] counts the stretches between averagings done.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    kept_ids, starts = data.subsample(corpus.token_ids, corpus.sentence_starts, keep_prob,
                                      data.epoch_rng(args.seed, epoch))  # equal on all ranks
    ids, local_starts = shard(kept_ids, starts, args.seed, epoch, rank, world_size)
    tokens_per_stretch = centers_per_step(args.batch_size, args.window_size) * args.sync_interval
    n_stretches = max(1, math.ceil(math.ceil(len(kept_ids) / world_size) / tokens_per_stretch))
    in_w, out_w = model.in_embed.weight.data.numpy(), model.out_embed.weight.data.numpy()
    threads = cpu_kernel.set_threads(args.num_threads)
    averager = Averager(model, args.block_momentum)
    words_per_stretch = len(corpus) / n_stretches
    first = position.get("step", 0)
    for i in range(first, n_stretches):
        stop = averager.sync_point(stop_signal()) if i > first else 0
        lo, hi = np.searchsorted(local_starts, [i * tokens_per_stretch, (i + 1) * tokens_per_stretch])
        token_lo = local_starts[lo] if lo < len(local_starts) else len(ids)
        token_hi = local_starts[hi] if hi < len(local_starts) else len(ids)
        lr_first, lr_last = (lr_at(args, (epoch + k / n_stretches) / args.epochs) for k in (i, i + 1))
        seed = int(data.epoch_rng(args.seed, epoch, 1 + rank, i).integers(1, 2**63))
        loss_sum, pairs = cpu_kernel.train_sentences(in_w, out_w, ids[token_lo:token_hi],
                                                     local_starts[lo:hi] - token_lo, args.window_size,
                                                     args.neg_sample_size, sampler, lr_first, lr_last, seed, threads)
        step(loss_sum, pairs, words_per_stretch, lr_last, {"step": i + 1})
        if stop:
            averager.finish()
            return stop
    averager.finish()  # every epoch ends with identical parameters, as dist_epoch's
    _say_interval_hint(averager, args)
    return 0


def pairs_of_windows(context_ids, weight, out_ids):
    """The real (center, context) pairs of windows and each pair's negatives (its center's), for autograd models."""
    rows, cols = weight.nonzero(as_tuple=True)
    return out_ids[rows, 0], context_ids[rows, cols], out_ids[rows, 1:]


def _autograd_step(model, optimizer, center_ids, context_ids, neg_ids, lr, synchronous, stop_signal):
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    n_local = len(center_ids)
    loss_sum = 0.0
    if n_local:  # a rank may get an empty last batch: it still takes part in the exchange
        loss = model(center_ids, context_ids, neg_ids)
        loss.backward()
        loss_sum = float(loss.detach()) * n_local
    stop = 0
    if synchronous:
        n_global, stop = sync_gradients(model, n_local, stop_signal)
        if n_global == 0:
            return 0.0, 0, stop
    elif n_local == 0:
        return 0.0, 0, 0
    optimizer.step()
    return loss_sum, n_local, stop
