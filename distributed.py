"""Training on several GPUs of one process (DataParallel) or on several processes and machines
(torch.distributed): the process group, and the strategies the training loops call.

The trainer resolves the world once (resolve_world), runs inside session(), and gives the
engine a strategy (make_strategy):
- OneProcess: steps are local; a signal stops the next step (--multi-gpu wraps the model in DataParallel).
- SyncRanks (--multi-node --sync): every step sums all ranks' gradients. Between the two phases
  of the engine's window step (its grads, then its apply) the ranks swap the rows they touched
  (point to point on the CPU, all-gathered on GPUs; never a dense all-reduce of the V x d
  tables); autograd steps reduce dense models' gradients through
  DistributedDataParallel and all-gather sparse gradients' rows.
- AsyncRanks (--multi-node --async): local SGD, whose changes are exchanged in a non-blocking
  all-reduce every --sync-interval steps (Averager).
"""
import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
from tqdm import tqdm

import cpu_kernel
from lazy import LazyModule, dist, torch

models = LazyModule("model")  # a run on one process may train without torch (lazy.py)

INIT_SCHEMES = ("tcp://", "file://", "env://")
# --async's default interval: 50 steps, and no fewer global pairs than 50 steps of the default
# batch (4096): an exchange costs a pass over the rows it sends and a round of messages, so a
# small batch must not exchange after a few milliseconds of training. Tied to text, the interval
# is the one bench_async_quality measured the quality of, whatever the batch.
MIN_SYNC_STEPS, MIN_SYNC_PAIRS = 50, 50 * 4096
# Bytes of a sparse --async exchange, as a share of the dense one's, below which the sparse one
# is chosen: it also copies its rows once more (staged, then laid out among the agreed rows) and
# agrees on which rows travel before sending them.
SPARSE_MAX_SHARE = 0.8
# Share of an --async epoch spent at sync points above which rank 0 suggests a longer interval.
EXCHANGE_HINT_SHARE = 0.25
DIST_TIMEOUT_MAX = 7 * 24 * 3600  # seconds; a longer wait for a rank is a typo
# Seconds past --dist-timeout after which a rank still joining gives up (join_group): the wait
# init_process_group times itself ends within it.
JOIN_GRACE_S = 1.0


class DistributedFailure(Exception):
    """A rank died, could not connect or timed out; reported in one line, exit 1."""


class SettingsMismatch(Exception):
    """The ranks were started with different settings; reported in one line, exit 2."""


@dataclass
class World:
    """This process's place among the ranks of a --multi-node run, resolved from flags or torchrun's variables."""
    rank: int
    world_size: int
    local_rank: int
    backend: str
    init_method: str
    timeout: float
    device: str  # the torch device this rank trains on (cuda: one GPU per process)


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
                        "keep it at 0.5 or below, larger values can diverge with many ranks")
    g.add_argument("--async-exchange", default="auto", choices=["auto", "dense", "sparse"],
                   help="--async: what an exchange sends. dense: every row of both tables; sparse: only the rows "
                        "some rank changed since the last exchange (with a bit per row to agree on them); auto "
                        "(default): the one with fewer bytes, chosen at each epoch's first exchange. Both give the "
                        "same vectors; on GPUs the exchange is dense")
    g.add_argument("--dist-timeout", type=float, default=120.0,
                   help="seconds a rank waits for the others (connecting, each collective) before failing")


def default_sync_interval(batch_size):
    """--sync-interval's default for a global batch of batch_size pairs."""
    return max(MIN_SYNC_STEPS, math.ceil(MIN_SYNC_PAIRS / max(1, batch_size)))


def check_flags(args, cuda_devices):
    """The distributed flags' mistakes, as one-line messages (empty: none). cuda_devices: GPUs visible."""
    problems = []
    if args.sync_interval <= 0:
        problems.append(f"--sync-interval must be positive, got {args.sync_interval}")
    if not 0 < args.dist_timeout <= DIST_TIMEOUT_MAX:
        problems.append(f"--dist-timeout must be a number of seconds in (0, {DIST_TIMEOUT_MAX}], "
                        f"got {args.dist_timeout}")
    if not 0 <= args.block_momentum < 1:
        problems.append(f"--block-momentum {args.block_momentum}: must be in [0, 1)")
    if args.block_momentum and not (args.multi_node and args.dist_mode == "async"):
        problems.append("--block-momentum goes with --multi-node --async")
    if args.async_exchange != "auto" and not (args.multi_node and args.dist_mode == "async"):
        problems.append("--async-exchange goes with --multi-node --async")
    if args.multi_gpu and args.multi_node:
        problems.append("--multi-gpu and --multi-node exclude each other: for several GPUs with torch.distributed, "
                        "run one --multi-node process per GPU (torchrun --nproc-per-node N)")
    if args.multi_gpu:
        wanted = args.num_gpu if args.num_gpu is not None else cuda_devices
        if cuda_devices == 0 or not 1 <= wanted <= cuda_devices:
            problems.append(f"--multi-gpu: {wanted if args.num_gpu is not None else 'some'} CUDA device(s) asked "
                            f"for, {cuda_devices} visible")
        if args.optimizer != "sgd":
            problems.append("--multi-gpu trains with plain SGD (DataParallel cannot reduce sparse gradients); "
                            "use --multi-node, one process per GPU, for other optimizers")
    elif args.num_gpu is not None:
        problems.append("--num-gpu goes with --multi-gpu")
    if not args.multi_node and (args.init_method or args.rank is not None or args.world_size is not None
                                or args.backend or args.dist_mode == "async"):
        problems.append("--backend, --init-method, --rank, --world-size and --async go with --multi-node")
    return problems


def resolve_world(args, environ, cuda_devices):
    """This rank's World from the flags or a launcher's variables (environ), for --multi-node runs;
    None otherwise. Raises ValueError with a one-line message for a flag that cannot work."""
    if not args.multi_node:
        return None
    init_method = args.init_method
    if init_method is None and args.rank is None and args.world_size is None and "RANK" in environ:
        init_method = "env://"  # launched by torchrun (or another launcher that sets its variables)
    if init_method is None:
        raise ValueError("--multi-node needs --init-method, --rank and --world-size, or torchrun's environment "
                         "(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)")
    if not init_method.startswith(INIT_SCHEMES):
        raise ValueError(f"--init-method {init_method}: not a torch.distributed init method; use one of "
                         f"{', '.join(s + '...' for s in INIT_SCHEMES)}")
    try:
        rank = args.rank if args.rank is not None else int(environ["RANK"])
        world_size = args.world_size if args.world_size is not None else int(environ["WORLD_SIZE"])
        local_rank = int(environ.get("LOCAL_RANK", rank))
    except (KeyError, ValueError):
        raise ValueError("--multi-node: give --rank and --world-size (or set RANK and WORLD_SIZE, as torchrun does)")
    if init_method.startswith("env://") and not {"MASTER_ADDR", "MASTER_PORT"} <= environ.keys():
        raise ValueError("--init-method env:// needs MASTER_ADDR and MASTER_PORT in the environment "
                         "(torchrun sets them)")
    if not 0 <= rank < world_size:
        raise ValueError(f"--rank {rank} must be in 0..{world_size - 1} (--world-size {world_size})")
    backend = args.backend or ("nccl" if args.device.startswith("cuda") else "gloo")
    if backend == "nccl" and (not dist.is_nccl_available() or not cuda_devices):
        raise ValueError("--backend nccl needs CUDA GPUs and a PyTorch built with NCCL; use --backend gloo on CPU")
    if backend == "nccl" and not args.device.startswith("cuda"):
        raise ValueError("--backend nccl moves GPU tensors only: add --device cuda")
    device = args.device
    if device == "cuda":  # one GPU per process: torchrun's LOCAL_RANK, else rank modulo GPUs here
        device = f"cuda:{local_rank % cuda_devices}"
    return World(rank, world_size, local_rank, backend, init_method, args.dist_timeout, device)


@contextlib.contextmanager
def session(world, dist_mode, settings=None):
    """Join the process group of a --multi-node run (world; None: nothing to join) and always
    leave it; distributed failures become one line. Ranks other than 0 print nothing. settings:
    what every rank must share (check_same_settings), compared before anything that depends on them."""
    if world is None:
        yield
        return
    silenced = finished = None
    try:
        if world.backend == "nccl":  # NCCL's first collectives (the checks below) run on the current GPU
            torch.cuda.set_device(torch.device(world.device))
        join_group(world.backend, world.init_method, world.rank, world.world_size, world.timeout)
        check_same_settings(settings or {})
        if world.backend == "gloo" and dist_mode == "sync":
            idle_gloo_io_thread()
        if world.backend == "gloo":  # names the ranks that never showed up, instead of a bare timeout
            dist.monitored_barrier(timeout=timedelta(seconds=world.timeout))
        if world.rank != 0:  # one voice: rank 0 prints and shows progress; errors still reach stderr
            silenced, sys.stdout = sys.stdout, open(os.devnull, "w")
        yield
        finished = leave_together()
    except dist.DistError as err:
        raise DistributedFailure(_describe(err, world)) from err
    except RuntimeError as err:  # Gloo/NCCL report dead peers and timeouts as plain RuntimeErrors too
        if not _looks_distributed(err):
            raise
        raise DistributedFailure(_describe(err, world)) from err
    finally:
        if silenced is not None:
            sys.stdout.close()
            sys.stdout = silenced
        if dist.is_initialized():
            dist.destroy_process_group()
        del finished  # after the group: see leave_together


def join_group(backend, init_method, rank, world_size, timeout):
    """dist.init_process_group, after importing torch._dynamo, within timeout seconds.

    torch.optim imports torch._dynamo on first use, and imported while a group exists (torch 2.13)
    it keeps the group alive past destroy_process_group: the group's Gloo threads then outlive
    the interpreter (see leave_together). A rank other than 0 that finds nobody at a tcp://
    address retries the connection after a random delay, up to twice the timeout: a deadline
    thread ends the process (nothing is written before the group is joined) with one line.
    """
    import torch._dynamo  # noqa: F401
    deadline = threading.Timer(timeout + JOIN_GRACE_S, _give_up_joining, (rank, world_size, init_method, timeout))
    deadline.daemon = True
    deadline.start()
    try:
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
    except dist.DistNetworkError as err:  # the store's own connect timeout can come first on a busy machine
        if "timed out" not in str(err):
            raise
        _give_up_joining(rank, world_size, init_method, timeout)
    finally:
        deadline.cancel()


def _give_up_joining(rank, world_size, init_method, timeout):
    print(f"error: rank {rank} of {world_size}: the other ranks did not all join at {init_method} within "
          f"--dist-timeout {timeout:g} s (is every rank started, with the same --init-method?)", file=sys.stderr,
          flush=True)
    os._exit(1)


def check_same_settings(settings):
    """Every rank must run with the settings of every other: settings maps a name (the flag, as
    the user knows it) to a JSON value. Raises SettingsMismatch on each rank that finds a
    difference, naming the first; every rank finds it, so none waits for another."""
    if not active():
        return
    mine = json.dumps(settings, sort_keys=True).encode()
    device = _comm_device()
    lengths = [int(n) for n in _all_gather_equal(torch.tensor([len(mine)], dtype=torch.int64, device=device))]
    padded = torch.zeros(max(lengths), dtype=torch.uint8)
    padded[:len(mine)] = torch.frombuffer(bytearray(mine), dtype=torch.uint8)
    me, settings = dist.get_rank(), json.loads(mine)  # compared as the others' arrive: through JSON
    for rank, (raw, length) in enumerate(zip(_all_gather_equal(padded.to(device)), lengths)):
        theirs = json.loads(bytes(raw[:length].cpu().tolist()))
        differing = [name for name in sorted(settings.keys() | theirs.keys()) if settings.get(name) != theirs.get(name)]
        if differing:
            name = differing[0]
            raise SettingsMismatch(f"rank {me}: {name} is {settings.get(name)} here but {theirs.get(name)} on rank "
                                   f"{rank}; every rank needs the same settings")


def idle_gloo_io_thread():
    """Linux: run the Gloo group's I/O thread (gloo_tcp_loop) under SCHED_IDLE, for --sync on the
    CPU; returns how many threads were moved (0 where /proc or SCHED_IDLE is missing).

    When data comes in while the main thread holds the connection's lock, the I/O thread only
    try-locks and waits on epoll again, which answers at once: it spins. With every core busy, it
    takes the core of the lock holder it waits for, for up to a scheduler slice, as long as a
    whole step. Under SCHED_IDLE it runs only on a core nobody else wants, which a sync step
    always leaves when it waits for the swap. Not for --async: its exchange must progress while
    every core trains."""
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
    join_group, a rank could abort after the last step of a short run."""
    finished = _barrier(async_op=True)
    finished.wait()
    return finished


def _barrier(async_op=False):
    """dist.barrier, on this rank's GPU under NCCL (named: without it, NCCL guesses, with a warning)."""
    on_gpu = dist.get_backend() == "nccl"
    return dist.barrier(async_op=async_op, device_ids=[torch.cuda.current_device()] if on_gpu else None)


def start_together():
    """Wait until every rank is ready to train. Ranks finish their start-up (imports, compiles,
    caches) at different times; without this wait the first exchange of the first epoch holds
    it, and the first epoch's time with it."""
    if active():
        _barrier()


def _looks_distributed(err):
    text = str(err).lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket",
                                         "store", "rendezvous", "rank"))


def _describe(err, world):
    first = (str(err).strip().splitlines() or [err.__class__.__name__])[0]
    if "EADDRINUSE" in first:  # rank 0 could not listen: nothing to do with the other ranks
        port = f"MASTER_PORT {os.environ.get('MASTER_PORT')}" if world.init_method == "env://" else world.init_method
        return (f"rank {world.rank} of {world.world_size}: the port of {port} is already in use (another run or "
                "program listens there); choose another port")
    return (f"rank {world.rank} of {world.world_size}: another rank died, closed its connection or did not answer "
            f"within --dist-timeout {world.timeout:g} s ({err.__class__.__name__}: {first[:300]})")


def active():
    """Whether this process is in a process group: never before torch is imported (lazy.py)."""
    return "torch.distributed" in sys.modules and dist.is_available() and dist.is_initialized()


def is_main():
    """Only rank 0 logs, evaluates and writes files."""
    return not active() or dist.get_rank() == 0


def rank_0_says(value):
    """Rank 0's value (a string or None) on every rank: what only rank 0 computes (the PIP loss)
    and all ranks must act on (an early stop)."""
    if not active():
        return value
    message = [value]
    dist.broadcast_object_list(message, src=0, device=_comm_device())
    return message[0]


class NullWriter:
    """TensorBoard writer of the ranks that do not log."""

    def add_scalar(self, *a, **k):
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
            raise SettingsMismatch(f"rank {rank} built another corpus than rank {dist.get_rank()}: every rank "
                                   "needs the same corpus files and preprocessing options")


def broadcast_parameters(model):
    """Start every rank from rank 0's parameters (fresh, --load-model or --resume alike)."""
    if active():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=0)


def data_parallel(model, num_gpu):
    """The model replicated on GPUs 0..num_gpu-1: each batch is split between them, the gradients
    are summed on GPU 0. engines._autograd_step divides the gathered sums by the batch size (the exact mean)."""
    class SummedLoss(torch.nn.Module):  # defined here, where torch is imported (lazy.py)
        """The loss summed over this replica's pairs, as a 1-element vector DataParallel can gather."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, center_ids, context_ids, neg_ids):
            return (self.model(center_ids, context_ids, neg_ids) * len(center_ids)).reshape(1)
    return torch.nn.DataParallel(SummedLoss(model), device_ids=list(range(num_gpu)))


def _comm_device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


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


def _exchange_rows_point_to_point(step, window, max_windows, stop_signal):
    """SyncRanks.gather_rows on the CPU, in one exchange. A buffer holds a region per rank: a first
    row [rows, pairs, stop signal, loss], then room for as many rows as a rank's step can touch
    (max_windows x (context slots + out slots), at most 2V). Each rank posts the receives of the
    others' regions, has the step write its distinct rows into its own region (grads' room) and
    sends the part it filled to every other rank; every rank then applies the rows of all regions
    in rank order, so all ranks compute the same bits. Posted before the rows are computed, the
    receives let a rank's rows travel while a slower rank still computes; and the row count
    travels in the region's first row: sent ahead on its own, it would cost a second round trip
    every step."""
    context_ids, weight, out_ids = window
    vocab, dim = step.model.vocab_size, step.model.embed_size
    me, world_size = dist.get_rank(), dist.get_world_size()
    region = 1 + min(2 * vocab, max_windows * (context_ids.shape[1] + out_ids.shape[1]))
    everyone = cpu_kernel.touched_rows(vocab, dim).scratch("everyone", (world_size * region, dim + 3))
    others = [rank for rank in range(world_size) if rank != me]
    receives = [dist.irecv(torch.from_numpy(everyone[rank * region:(rank + 1) * region]), rank) for rank in others]
    rows = step.grads(context_ids, weight, out_ids, room=lambda n: everyone[me * region + 1:me * region + 1 + n])
    mine = everyone[me * region:me * region + 1 + len(rows.packed)]
    mine[0] = 0.0
    mine[0, :4] = len(rows.packed), float(weight.sum(dtype=torch.float64)), stop_signal, float(rows.stats[0])
    sends = [dist.isend(torch.from_numpy(mine), rank) for rank in others]
    for work in receives + sends:
        work.wait()
    firsts = everyone[::region]  # each region's first row
    starts = np.arange(world_size, dtype=np.int64) * region + 1
    segments = np.stack([starts, starts + firsts[:, 0].astype(np.int64)], 1)
    stats = (float(firsts[:, 3].sum(dtype=np.float64)), int(firsts[:, 1].sum()))
    return models.Rows(torch.from_numpy(everyone), stats, segments), int(firsts[:, 2].max())


def _exchange_rows_all_gather(step, window, max_windows, stop_signal):
    """SyncRanks.gather_rows on GPUs (NCCL's all-gather). Each rank's step gives one packed row a
    slot, at most max_windows x (context slots + out slots) of them: every rank sends that many
    rows and a last one holding its row count, loss, pairs and stop signal, so that one
    all-gather carries all and the host waits for the GPU once a step, for the counts."""
    rows = step.grads(*window)
    n_rows, width = rows.packed.shape
    room = max_windows * (window[0].shape[1] + window[2].shape[1])
    buffer = rows.packed.new_zeros(room + 1, width)
    buffer[:n_rows] = rows.packed
    buffer[room, :4] = torch.cat([torch.tensor([n_rows], device=buffer.device, dtype=buffer.dtype), rows.stats,
                                  torch.tensor([stop_signal], device=buffer.device, dtype=buffer.dtype)])
    parts = _all_gather_equal(buffer)
    header = torch.stack([part[room, :4] for part in parts]).cpu()
    counts = header[:, 0].long().tolist()
    # rank order: every rank adds the same sums
    packed = torch.cat([part[:n] for part, n in zip(parts, counts)])
    return models.Rows(packed, header[:, 1:3].sum(0)), int(header[:, 3].max())


# ---------------------------------------------------------------------------------------------
# Gradients of autograd steps, summed over ranks

def _sparse_params(model):
    """Parameters whose gradient is sparse (nn.Embedding(sparse=True)): decided by the model, not by the batch."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding) and m.sparse]


def sum_sparse_gradients(model):
    """Every sparse gradient becomes the sum of all ranks' (each rank weighed its loss by its
    share of the global batch, so the sum is the gradient of the global mean). The rows travel
    coalesced, all-gathered; a rank without a gradient (no pairs) sends none."""
    params = _sparse_params(model)
    grads = [p.grad.coalesce() if p.grad is not None else
             torch.sparse_coo_tensor(torch.zeros((1, 0), dtype=torch.int64, device=p.device),
                                     p.new_zeros((0,) + p.shape[1:]), p.shape) for p in params]
    mine = torch.tensor([g.indices().shape[1] for g in grads], dtype=torch.float64, device=_comm_device())
    counts = torch.stack(_all_gather_equal(mine)).cpu().long()
    for column, (p, g) in enumerate(zip(params, grads)):
        rows, values = _gather_rows(g.indices()[0], g.values(), counts[:, column].tolist())
        p.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), values, p.shape).coalesce()


def _all_gather_numbers(*numbers):
    """Every rank's few numbers, as a world_size x n float64 table on the host."""
    return _start_header(*numbers)()


def batch_agreement():
    """Each autograd step's all-gather of every rank's pair count and pending signal: an object
    with exchange(n_local, signal_number) -> (pairs over all ranks, the largest pending signal).

    It is Joinable, so that under DistributedDataParallel's join() a rank whose steps have run out
    answers the others' all-gathers with zeros (no pairs, no signal) until all have joined. Its
    classes are made here, where torch is imported (lazy.py).
    """
    from torch.distributed.algorithms.join import Join, Joinable, JoinHook

    class AbsentFromAgreement(JoinHook):
        def main_hook(self):
            _all_gather_numbers(0, 0)

    class BatchAgreement(Joinable):
        def __init__(self):  # Joinable declares __init__ abstract
            super().__init__()

        def exchange(self, n_local, signal_number):
            Join.notify_join_context(self)
            table = _all_gather_numbers(n_local, signal_number)
            return int(table[:, 0].sum()), int(table[:, 1].max())

        def join_hook(self, **kwargs):
            return AbsentFromAgreement()

        @property
        def join_device(self):
            return _comm_device()

        @property
        def join_process_group(self):
            return dist.group.WORLD
    return BatchAgreement()


# ---------------------------------------------------------------------------------------------
# Strategies: what the training loops ask of the distribution

class OneProcess:
    """One process: steps are local, and a pending signal stops the loop before its next step.
    multi_gpu: the autograd loop's model is replicated on num_gpu GPUs (DataParallel)."""
    rank, world_size = 0, 1
    needs_every_backward = False

    def __init__(self, multi_gpu=False, num_gpu=None):
        self.multi_gpu, self.num_gpu = multi_gpu, num_gpu

    def wrap(self, model):
        """What the autograd loop calls for the loss."""
        return data_parallel(model, self.num_gpu) if self.multi_gpu else model

    def warm_up(self, device):
        pass

    def on_epoch_start(self, model):
        pass

    def on_epoch_end(self, stop):
        """Called when an epoch's loop returns; returns the stop signal (0: none)."""
        return stop

    def before_step(self, step, first_step, signal_number):
        """The stop agreed before a step (0: go on)."""
        return signal_number

    def next_sync_point(self, step):
        """The next step before which the ranks exchange (a compiled call must end there)."""
        return math.inf

    def row_marks(self, *params):
        """A byte per row of each parameter where a compiled loop marks the rows it writes; None: not wanted."""
        return None

    def gather_rows(self, step, window, max_windows, signal_number):
        """The rows a window step applies (model.Rows; step.grads of this rank's windows, or of
        every rank's), and the stop agreed after it. max_windows: the most windows a rank's step holds."""
        return step.grads(*window), signal_number

    def uneven_steps(self, train_model, n_steps, my_steps):
        """The context the autograd loop runs in (DDP's join where ranks may end at different
        steps); it gives how many steps this rank runs: n_steps, or under join() its own my_steps."""
        return contextlib.nullcontext(n_steps)

    def agree_on_batch(self, n_local, signal_number):
        """(pairs of the global batch, the factor on this rank's mean loss that makes the reduced
        gradient the global mean's, the stop agreed after this step)."""
        return n_local, 1.0, signal_number

    def reduce_gradients(self, model, n_local):
        pass


class SyncRanks(OneProcess):
    """--multi-node --sync: every step is one step on the global batch, and all ranks hold
    identical parameters after it. Window steps apply the touched rows of all ranks
    (gather_rows); autograd steps of dense models go through DistributedDataParallel, with
    its join() for a rank whose last step is empty; sparse gradients are all-gathered by row."""

    def __init__(self, world):
        super().__init__()
        self.world = world
        self.rank, self.world_size = world.rank, world.world_size
        self.agreement = batch_agreement()
        self.ddp = None

    def wrap(self, model):
        if _sparse_params(model):
            return model
        device_ids = [torch.device(self.world.device).index] if self.world.device.startswith("cuda") else None
        # the spelling buffers of the rnn model never change: no broadcast of them at every step
        self.ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
        self.needs_every_backward = True
        return self.ddp

    def before_step(self, step, first_step, signal_number):
        return 0  # agreed within the step

    def gather_rows(self, step, window, max_windows, signal_number):
        """Every rank's rows: the loss is a sum over pairs, so the rows of all ranks, applied
        together, make one single-process step on the concatenated global batch, each row
        scaled by its count over all ranks. Only touched rows travel, each rank's summed per
        row on the CPU (point to point), one per slot on GPUs (all-gathered)."""
        if window[0].device.type == "cpu":
            return _exchange_rows_point_to_point(step, window, max_windows, signal_number)
        return _exchange_rows_all_gather(step, window, max_windows, signal_number)

    @contextlib.contextmanager
    def uneven_steps(self, train_model, n_steps, my_steps):
        if self.ddp is None:
            yield n_steps
            return
        from torch.distributed.algorithms.join import Join
        with Join([self.agreement, self.ddp]):
            yield my_steps

    def agree_on_batch(self, n_local, signal_number):
        n_global, stop = self.agreement.exchange(n_local, signal_number)
        share = n_local / max(n_global, 1)
        weight = share * self.world_size if self.ddp is not None else share  # DDP averages over ranks
        return n_global, weight, stop

    def reduce_gradients(self, model, n_local):
        if self.ddp is None:
            sum_sparse_gradients(model)

    def on_epoch_end(self, stop):
        """Ranks that left a join() early meet the others again here, and learn of a stop."""
        if self.ddp is None:
            return stop
        return int(_all_gather_numbers(stop)[:, 0].max())


class AsyncRanks(OneProcess):
    """--multi-node --async: local steps; every sync_interval steps the ranks' changes are
    exchanged in the background (Averager), and every epoch ends with a blocking exchange, so
    the PIP loss and checkpoints see identical parameters on all ranks. A sparse exchange is
    sent half an interval after its sync point (its send point), once the ranks agreed on its
    rows. A stop asked for between two sync points is agreed at the next one but one."""

    def __init__(self, world, sync_interval, block_momentum, exchange="auto"):
        super().__init__()
        self.rank, self.world_size = world.rank, world.world_size
        self.sync_interval, self.block_momentum, self.exchange = sync_interval, block_momentum, exchange
        self.averager = None
        self.hinted = False

    def warm_up(self, device):
        if device.type == "cpu":
            cpu_kernel.warm_up_exchange()

    def on_epoch_start(self, model):
        self.averager = Averager(model, self.block_momentum, self.exchange)  # each epoch starts from a consensus

    def on_epoch_end(self, stop):
        self.averager.finish()
        if not stop:
            self._hint_once()
        return stop

    def before_step(self, step, first_step, signal_number):
        agreed = 0
        if step > first_step and step % self.sync_interval == 0:
            agreed = self.averager.sync_point(signal_number)
        if step % self.sync_interval == self.sync_interval // 2:
            self.averager.send_point()
        return agreed

    def next_sync_point(self, step):
        interval = self.sync_interval
        start = step // interval * interval
        if self.averager.mode != "dense" and step < start + interval // 2:
            return start + interval // 2
        return start + interval

    def row_marks(self, *params):
        return self.averager.row_marks(*params)

    def gather_rows(self, step, window, max_windows, signal_number):
        return step.grads(*window), 0

    def agree_on_batch(self, n_local, signal_number):
        return n_local, 1.0, 0

    def _hint_once(self):
        """Rank 0 says once a run when an epoch spent too long exchanging (interval_hint)."""
        message = interval_hint(self.averager.exchange_share(), self.sync_interval)
        if message and not self.hinted and self.rank == 0:
            self.hinted = True
            tqdm.write(message)  # above the progress bar, not through it


def make_strategy(args, world):
    """The strategy of a run: one process (maybe --multi-gpu), or --multi-node --sync / --async ranks."""
    if world is None:
        return OneProcess(args.multi_gpu, args.num_gpu)
    if args.dist_mode == "sync":
        return SyncRanks(world)
    return AsyncRanks(world, args.sync_interval, args.block_momentum, args.async_exchange)


def interval_hint(share, interval):
    """What rank 0 says when an --async epoch spent share of its time at sync points, or None."""
    if share < EXCHANGE_HINT_SHARE:
        return None
    return (f"note: this epoch spent {share:.0%} of its time exchanging with the other ranks (every "
            f"--sync-interval {interval} steps); a larger --sync-interval trains faster, at some cost in word "
            "similarity (README: Several GPUs and machines)")


class ExchangeStats:
    """What an epoch's exchanges cost this rank: their count, the bytes it put into their
    all-reduces (flags and changes), the rows they carried, the seconds spent at sync and send
    points, how many of those it waited for the other ranks, and the CPU seconds of its own
    passes there (the training thread's: Gloo's threads not included)."""

    def __init__(self):
        self.exchanges, self.bytes, self.rows = 0, 0, 0
        self.seconds = self.waited = self.cpu = 0.0

    @contextlib.contextmanager
    def timed(self):
        began, began_cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - began
            self.cpu += time.thread_time() - began_cpu

    def wait(self, work):
        began = time.perf_counter()
        work.wait()
        self.waited += time.perf_counter() - began


def choose_exchange(dense_bytes, sparse_bytes):
    """'sparse' or 'dense': what an --async epoch's exchanges send, from what its first exchange
    sends either way (figures every rank shares, so every rank chooses the same)."""
    return "sparse" if sparse_bytes < SPARSE_MAX_SHARE * dense_bytes else "dense"


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

    The exchange is dense (every row of every table travels) or sparse (only the rows some rank
    changed): the same sums, so the same parameters. Sparse, each rank marks the rows it changes
    (the CPU kernel marks them as it writes them; other loops' rows are found by comparison) and
    at sync point k stages its changes and starts an all-reduce of one bit per row (OR: the
    union of the rows every rank changed); at the send point, half an interval later, it lays its
    staged rows out among the union's and starts their all-reduce. Nobody waits for the union
    unless a rank is half an interval behind, and what is applied at k+1 is the same as dense.
    The first exchange of an epoch waits for its union and picks the cheaper of the two by
    bytes (choose_exchange; --async-exchange can force either). On GPUs the exchange is dense.

    The changes travel as bfloat16: half the bytes of float32, and what the rounding leaves out
    (at most 1/256 of a change) is kept and sent with the row's next change, or at the epoch's
    end (error feedback), so nothing a rank learns is lost, only delayed; the epoch's last
    leftovers are dropped. The all-reduce's CPU time drops with its bytes (bench/bench_distributed.py).

    A plain average of the ranks' parameters keeps 1/world-size of what each rank learnt: with
    2 ranks, every change made on half the text is halved. The row-wise mean gives a row that
    one rank alone changed (a rare word's vector) that rank's whole change. The block momentum
    (Chen & Huo 2016, "BMUF"; --block-momentum, default 0) gives back, over the next exchanges,
    what averaging takes from the rows all ranks changed. In a simple model of one row (each
    rank's interval closes a fraction a of its gap to the row's target; the consensus hears of
    it one exchange later) the gap follows z^2 - (1 + m) z + (m + a) = 0 from exchange to
    exchange: it shrinks while m + a < 1, so a large momentum diverges (bench/RESULTS.md). A
    sparse exchange still moves every row whose momentum has not died out.

    Copies of the parameters it holds: the consensus and sent_from (float32), what rounding left
    out (bfloat16), and wire buffers: dense, one of the tables' size (bfloat16); sparse, two of
    the agreed rows' and this rank's rows' size, at most the tables'. Momentum adds a float32 copy.
    """

    def __init__(self, model, block_momentum=0.0, exchange="auto", wire_dtype=None):
        self.params = list(model.parameters())  # equal on all ranks here: every epoch starts from a consensus
        self.consensus = torch.cat([p.data.reshape(-1) for p in self.params])
        self.sent_from = self.consensus.clone()  # this rank's parameters when it last sent its changes
        self.unsent = torch.zeros_like(self.consensus, dtype=torch.bfloat16)  # what rounding kept out of sends
        self.block_momentum = block_momentum  # each epoch (and each resumed one) starts without momentum
        self.momentum = torch.zeros_like(self.consensus) if block_momentum else None
        self.wire_dtype = torch.bfloat16 if wire_dtype is None else wire_dtype  # the default: torch's, read here
        self.tables = [_Table(self, p, flat) for p, flat in zip(self.params, _flat_slices(self.params))]
        self.mode = exchange if self.consensus.device.type == "cpu" else "dense"  # auto: the first exchange decides
        self.storage = {}
        self.flags = [torch.zeros(sum(t.n_bytes for t in self.tables), dtype=torch.uint8) for _ in range(2)]
        self.turn = 0  # which of flags this rank's rows go into next; the other holds the last union
        self.work = self.agreement = None  # the changes' all-reduce in flight; the union's
        self.in_flight, self.received_rows = None, None  # the buffer of the all-reduce in flight, its rows per table
        self.staged_rows = []  # rows of each table this rank staged for the union's all-reduce
        self.stop_to_send = self.sent = 0
        self.stats, self.started = ExchangeStats(), time.perf_counter()

    def exchange_share(self):
        """The share of the time since this epoch began spent at sync points (passes and waits)."""
        return self.stats.seconds / max(time.perf_counter() - self.started, 1e-9)

    def row_marks(self, *params):
        """A byte per row of each of these parameters, where the training loop marks the rows it
        writes: the sparse exchange then needs no comparison of whole tables. None: no marks wanted."""
        if self.mode == "dense":
            return None
        tables = [next(t for t in self.tables if t.param is p) for p in params]
        for table in tables:
            table.marked_by_loop = True
        return [table.marks for table in tables]

    def sync_point(self, stop_signal):
        """Apply the previous exchange and start the next (sparse: stage it for send_point);
        returns the stop signal agreed at the previous one."""
        with self.stats.timed():
            received, agreed = self._receive()
            self.stop_to_send = stop_signal
            if self.mode == "dense":
                self._dense_pass(received, send=True)
            else:
                if self.agreement is not None:  # a loop that skipped the send point
                    self._send_staged()
                self._stage(received)
                if self.mode == "auto":  # the epoch's first exchange: the union decides, so wait for it now
                    self._send_staged()
        return agreed

    def send_point(self):
        """Sparse: once the union of the staged exchange is agreed, start the all-reduce of its rows."""
        if self.agreement is not None:
            with self.stats.timed():
                self._send_staged()

    def finish(self):
        """Blocking: apply what is pending, exchange the rest, and set every rank to the same consensus."""
        with self.stats.timed():
            if self.agreement is not None:
                self._send_staged()
            received, _ = self._receive()
            self.stop_to_send = 0
            if self.mode == "dense":
                self._dense_pass(received, send=True, flush=True)
            else:
                self._stage(received, flush=True)
                self._send_staged()
            self._receive()
            if self.mode == "dense":
                self._dense_pass(True, send=False)
            else:
                self._sparse_pass(True, send=False)

    def _receive(self):
        """Wait for the all-reduce in flight: (whether there was one, the stop it agreed on, or 0).
        A sum of signals says that some rank must stop, not which signal: a rank that asked for
        none stops as if terminated."""
        if self.work is None:
            return False, 0
        self.stats.wait(self.work)
        self.work = None
        stop = self.in_flight[-1] > 0
        return True, (self.sent or int(signal.SIGTERM)) if stop else 0

    def _start(self, buffer, rows):
        """Start the all-reduce of a buffer laid out by _lay_out for rows[i] rows of table i, this
        rank's stop signal last."""
        buffer[-1] = float(self.stop_to_send)
        self.sent = self.stop_to_send
        self.in_flight, self.received_rows = buffer, rows
        self.work = dist.all_reduce(buffer, async_op=True)
        self.stats.exchanges += 1
        self.stats.bytes += buffer.numel() * buffer.element_size()
        self.stats.rows += sum(rows)

    def _wire_size(self, rows):
        """Elements of a wire buffer carrying rows[i] rows of table i."""
        return sum(n * (t.width + 1) for n, t in zip(rows, self.tables)) + 1

    def _room(self, name, size):
        """A wire buffer of size elements on storage kept under name, grown by half when too small:
        allocated afresh at every exchange, it would pay its page faults every time."""
        store = self.storage.get(name)
        if store is None or store.numel() < size:
            grown = size if store is None or name == "dense" else max(size, 3 * store.numel() // 2)
            store = self.storage[name] = self.consensus.new_empty(grown, dtype=self.wire_dtype)
        return store[:size]

    def _lay_out(self, buffer, rows):
        """Per table, (its rows x width changes, its rows' counts) in a buffer carrying rows[i] rows of table i."""
        changes, offset = [], 0
        for n, table in zip(rows, self.tables):
            changes.append(buffer[offset:offset + n * table.width].view(n, table.width))
            offset += n * table.width
        return list(zip(changes, buffer[offset:offset + sum(rows)].split(list(rows))))

    def _dense_pass(self, received, send, flush=False):
        """Every row of every table, in place in the dense buffer (a row's received sum is read before
        its change is written); with send, starts the buffer's all-reduce."""
        every_rows = [t.rows for t in self.tables]
        buffer = self._room("dense", self._wire_size(every_rows))
        for table, (changes, counts) in zip(self.tables, self._lay_out(buffer, every_rows)):
            every = table.every_row()
            table.run(every, changes, counts, every, changes, counts, every, received, send, flush)
        if send:
            self._start(buffer, every_rows)

    def _stage(self, received, flush=False):
        """Sparse: apply what was received and stage this rank's changes (_sparse_pass), then start
        the all-reduce of its rows' bits (OR: the union of the rows some rank changed)."""
        self.staged_rows = self._sparse_pass(received, send=True, flush=flush)
        self.agreement = dist.all_reduce(self.flags[self.turn], op=dist.ReduceOp.BOR, async_op=True)
        self.stats.bytes += self.flags[self.turn].numel()

    def _sparse_pass(self, received, send, flush=False):
        """The rows of the last union (their received changes applied), this rank's marked rows (their
        changes staged when send) and those whose momentum still moves; returns this rank's row counts."""
        mine = self.flags[self.turn].split([t.n_bytes for t in self.tables])
        plans = [table.plan(bits.numpy(), received, flush and send) for table, bits in zip(self.tables, mine)]
        staged_rows = [n_mine for _, n_mine in plans]
        staged = self._lay_out(self._room("staged", self._wire_size(staged_rows)), staged_rows)
        received_views = self._lay_out(self.in_flight, self.received_rows) if received else staged
        for table, (n, _), out, got in zip(self.tables, plans, staged, received_views):
            rows, recv_slots, send_slots = table.plan_arrays[:, :n]
            table.run(rows, *got, recv_slots, *out, send_slots, received, send, flush)
            table.staged = rows[send_slots >= 0]
        return staged_rows

    def _send_staged(self):
        """Wait for the union of the staged rows, lay this rank's staged rows out among the union's
        (zeros elsewhere) and start their all-reduce. At an epoch's first exchange the union decides
        between sparse and dense; dense, the union is every row."""
        self.stats.wait(self.agreement)
        self.agreement = None
        unions = [u.numpy() for u in self.flags[self.turn].split([t.n_bytes for t in self.tables])]
        self.turn = 1 - self.turn
        union_rows = [int(np.bitwise_count(u).sum()) for u in unions]
        every_rows = [t.rows for t in self.tables]
        if self.mode == "auto":
            width = torch.finfo(self.wire_dtype).bits // 8
            self.mode = choose_exchange(width * self._wire_size(every_rows),
                                        width * self._wire_size(union_rows) + self.flags[0].numel())
        if self.mode == "dense":
            unions, union_rows = [t.every_row_bits() for t in self.tables], every_rows
        buffer = self._room(self.mode, self._wire_size(union_rows))
        staged = self._lay_out(self.storage["staged"], self.staged_rows)
        laid_out = self._lay_out(buffer, union_rows)
        for table, union, (changes, counts), (out, out_counts) in zip(self.tables, unions, staged, laid_out):
            cpu_kernel.scatter_rows(union, table.staged, _bits(changes), _bits(counts), _bits(out), _bits(out_counts))
            table.union = union
        self._start(buffer, union_rows)


def _flat_slices(params):
    offset = 0
    for p in params:
        yield slice(offset, offset + p.numel())
        offset += p.numel()


class _Table:
    """One parameter's part of an Averager's exchange: rows x width views of the parameter and of the
    Averager's flat copies, and the sparse exchange's bookkeeping: a mark per row (rows this rank
    wrote), a state per row (cpu_kernel.PENDING, ALIVE), the last agreed union of rows (a bit each),
    the rows this rank staged, and room for the plan of the rows a pass visits."""

    def __init__(self, averager, param, flat):
        self.averager, self.param = averager, param
        self.rows = param.shape[0] if param.dim() else 1
        copies = [averager.sent_from, averager.consensus, averager.unsent]
        self.views = [param.data.view(self.rows, -1)] + [t[flat].view(self.rows, -1) for t in copies]
        self.width = self.views[0].shape[1]
        self.momentum = (averager.momentum[flat].view(self.rows, -1) if averager.momentum is not None
                         else self.views[2].new_zeros(0, 1))
        self.n_bytes = math.ceil(self.rows / 8)  # the union's bits
        self.marks = np.zeros(8 * self.n_bytes, dtype=np.uint8)  # whole 8-byte words: plan_rows reads 8 at a time
        self.state = torch.zeros(8 * self.n_bytes, dtype=torch.uint8, device=param.device)
        self.marked_by_loop = False
        self.union = self.staged = self.plan_arrays = self._every = None

    def every_row(self):
        """Each row's index (the dense exchange's rows and slots)."""
        if self._every is None:
            self._every = torch.arange(self.rows, device=self.param.device)
            if self.param.device.type == "cpu":
                self._every = self._every.numpy()
        return self._every

    def every_row_bits(self):
        """Every row as a union's bits (the dense exchange's union)."""
        return np.packbits(np.ones(self.rows, dtype=bool), bitorder="little")

    def plan(self, bits, received, flush):
        """The rows a sparse pass visits (cpu_kernel.plan_rows) into plan_arrays; (rows, this rank's rows)."""
        if self.plan_arrays is None:
            self.plan_arrays = np.empty((3, self.rows), dtype=np.int64)
        if not self.marked_by_loop:
            values, sent_from = self.views[:2]
            cpu_kernel.mark_changed_rows(values.numpy(), sent_from.numpy(), self.marks)
        union = self.union if received else _NO_BITS
        return cpu_kernel.plan_rows(union, self.marks, self.state.numpy(), flush, *self.plan_arrays, bits)

    def run(self, rows, received, received_counts, recv_slots, changes, change_counts, send_slots, apply, send,
            flush):
        """The exchange pass over rows (cpu_kernel.exchange_rows on the CPU, exchange_rows on GPUs)."""
        momentum, block_momentum = self.momentum, self.averager.block_momentum
        if self.param.device.type == "cpu":
            cpu_kernel.exchange_rows(*(v.numpy() for v in self.views[:3]), _bits(self.views[3]), momentum.numpy(),
                                     np.float32(block_momentum), rows, _bits(received), _bits(received_counts),
                                     recv_slots, _bits(changes), _bits(change_counts), send_slots,
                                     self.state.numpy(), apply, send, flush)
        else:
            exchange_rows(*self.views, momentum, block_momentum, rows, received, received_counts, recv_slots, changes,
                          change_counts, send_slots, self.state, apply, send, flush)


_NO_BITS = np.zeros(0, dtype=np.uint8)


def _bits(tensor):
    """A CPU tensor as a numpy array; a float's bits where it travels or is stored in fewer bits (bfloat16, which
    numpy lacks, as uint16; the wire's float32 as uint32)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    if tensor.dtype == torch.float32:
        return tensor.view(torch.int32).numpy().view(np.uint32)
    return tensor.numpy()


def exchange_rows(values, sent_from, consensus, unsent, momentum, block_momentum, rows, received, received_counts,
                  recv_slots, changes, change_counts, send_slots, state, apply, send, flush):
    """An exchange's pass over the listed rows of one parameter (rows x width views; cpu_kernel.exchange_rows
    is the same, compiled). rows, recv_slots and send_slots are index tensors; unsent is bfloat16,
    received, received_counts, changes and change_counts of the wire's dtype, state a byte per row.
    apply: each row with a received slot moves the consensus by its mean change (received: the
    ranks' summed changes, received_counts how many ranks changed the row) through the block
    momentum, as does each row whose momentum still moves (state ALIVE). send: each row takes
    this rank's progress since sent_from plus what the last rounding left out (unsent); in its
    send slot, if it changed or with flush, goes that total rounded for the wire, and unsent keeps
    what the rounding leaves out (state PENDING when not 0); values and sent_from become the
    consensus plus all this rank learnt that the consensus has not heard of. Without send, values
    become the consensus (the epoch's end)."""
    if apply:
        _apply_rows(consensus, momentum, block_momentum, state, rows, received, received_counts, recv_slots)
    if send:
        _send_rows(values, sent_from, consensus, unsent, state, rows, changes, change_counts, send_slots, flush)
    else:
        values[rows] = consensus[rows]


def _apply_rows(consensus, momentum, block_momentum, state, rows, received, received_counts, recv_slots):
    moving = recv_slots >= 0
    if block_momentum:
        moving |= (state[rows] & cpu_kernel.ALIVE) != 0
    rows, slots = rows[moving], recv_slots[moving]
    step = consensus.new_zeros(len(rows), consensus.shape[1])
    got = slots >= 0
    step[got] = received[slots[got]].float() / received_counts[slots[got]].float().clamp(min=1.0).unsqueeze(1)
    if block_momentum:
        step = momentum[rows].mul_(block_momentum).add_(step)
        momentum[rows] = step
        alive = (step != 0).any(dim=1)
        state[rows] = torch.where(alive, state[rows] | cpu_kernel.ALIVE, state[rows] & ~cpu_kernel.ALIVE)
    consensus[rows] += step


def _send_rows(values, sent_from, consensus, unsent, state, rows, changes, change_counts, send_slots, flush):
    progress = values[rows] - sent_from[rows]
    changed = (progress != 0).any(dim=1)
    total = progress.add_(unsent[rows].float())
    values[rows] = consensus[rows] + total
    sent_from[rows] = values[rows]
    slotted = send_slots >= 0
    rows, slots, total, changed = rows[slotted], send_slots[slotted], total[slotted], changed[slotted]
    change_counts[slots] = changed.to(change_counts.dtype)
    going = changed | flush  # an unchanged row's leftover waits for its next change
    rounded = total.to(changes.dtype)
    rounded[~going] = 0
    changes[slots] = rounded
    rows, left = rows[going], (total[going] - rounded[going].float()).bfloat16()
    unsent[rows] = left
    pending = (left != 0).any(dim=1)
    state[rows] = torch.where(pending, state[rows] | cpu_kernel.PENDING, state[rows] & ~cpu_kernel.PENDING)
