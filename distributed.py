"""Training on several GPUs of one process (DataParallel) or on several processes and machines
(torch.distributed): the process group, and the strategies the training loops call.

The trainer resolves the world once (resolve_world), runs inside session(), and gives the
engine a strategy (make_strategy):
- OneProcess: steps are local; a signal stops the next step (--multi-gpu wraps the model in DataParallel).
- SyncRanks (--multi-node --sync): every step sums all ranks' gradients. SGD window steps send
  only the rows they touched (point to point on the CPU, all-gathered on GPUs; never a dense
  all-reduce of the V x d tables); autograd steps reduce dense models' gradients through
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
import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join, Joinable, JoinHook
from tqdm import tqdm

import cpu_kernel
import model as models

INIT_SCHEMES = ("tcp://", "file://", "env://")
# --async's default interval: 50 steps, and no fewer global pairs than 50 steps of the default
# batch (4096): each exchange sends both whole tables, so a small batch must not exchange after a
# few milliseconds of training. Tied to text, the interval is the one bench_async_quality
# measured the quality of, whatever the batch.
MIN_SYNC_STEPS, MIN_SYNC_PAIRS = 50, 50 * 4096
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
    return (f"rank {world.rank} of {world.world_size}: another rank died, closed its connection or did not answer "
            f"within --dist-timeout {world.timeout:g} s ({err.__class__.__name__}: {first[:300]})")


def active():
    return dist.is_available() and dist.is_initialized()


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
    rank order (cpu_kernel.apply_rows), so all ranks compute the same bits. The row count
    travels in the region's first row: sent ahead on its own, it would cost a second round
    trip every step."""
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
    all-gather that runs while the buffer is filled. The host waits for the GPU only twice a
    step: for the number of distinct rows and for the row counts; the step is bound by launching
    its few dozen kernels. Returns (global loss sum and pairs, on the device; agreed stop signal).
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


class BatchAgreement(Joinable):
    """Each autograd step's all-gather of every rank's pair count and pending signal.

    Joinable, so that under DistributedDataParallel's join() a rank whose steps have run out
    answers the others' all-gathers with zeros (no pairs, no signal) until all have joined.
    """

    def __init__(self):
        super().__init__()

    def exchange(self, n_local, signal_number):
        """(pairs over all ranks, the largest pending signal)."""
        Join.notify_join_context(self)
        table = _all_gather_numbers(n_local, signal_number)
        return int(table[:, 0].sum()), int(table[:, 1].max())

    def join_hook(self, **kwargs):
        return _AbsentFromAgreement()

    @property
    def join_device(self):
        return _comm_device()

    @property
    def join_process_group(self):
        return dist.group.WORLD


class _AbsentFromAgreement(JoinHook):
    def main_hook(self):
        _all_gather_numbers(0, 0)


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

    def start_epoch(self, model):
        pass

    def end_epoch(self, stop):
        """Called when an epoch's loop returns; returns the stop signal (0: none)."""
        return stop

    def before_step(self, step, first_step, signal_number):
        """The stop agreed before a step (0: go on)."""
        return signal_number

    def next_sync_point(self, step):
        """The next step before which the ranks exchange (a compiled call must end there)."""
        return math.inf

    def window_step(self, local_step, model, window, lr, max_windows, signal_number):
        """(the step's [loss sum, pairs], the stop agreed after it)."""
        return local_step(*window, lr), signal_number

    def uneven_steps(self, train_model):
        """The context the autograd loop runs in (DDP's join where ranks may end at different steps)."""
        return contextlib.nullcontext()

    def steps_to_run(self, n_steps, my_steps):
        """How many steps this rank's autograd loop runs: all ranks the same, except under join()."""
        return n_steps

    def agree_on_batch(self, n_local, signal_number):
        """(pairs of the global batch, the stop agreed after this step)."""
        return n_local, signal_number

    def loss_weight(self, n_local, n_global):
        """The factor on this rank's mean loss that makes the reduced gradient the global mean's."""
        return 1.0

    def placeholder_batch(self, batch):
        """A one-pair batch of valid ids, for a rank with no pairs whose backward must still run."""
        return [t[:0].new_zeros((1,) + t.shape[1:]) for t in batch]

    def reduce_gradients(self, model, n_local):
        pass

    def agree_at_epoch_end(self, stop):
        return stop


class SyncRanks(OneProcess):
    """--multi-node --sync: every step is one step on the global batch, and all ranks hold
    identical parameters after it. Window steps sum the touched rows of all ranks
    (sync_window_step); autograd steps of dense models go through DistributedDataParallel, with
    its join() for a rank whose last step is empty; sparse gradients are all-gathered by row."""

    def __init__(self, world):
        super().__init__()
        self.world = world
        self.rank, self.world_size = world.rank, world.world_size
        self.agreement = BatchAgreement()
        self.ddp = None

    def wrap(self, model):
        if _sparse_params(model):
            return model
        device_ids = [torch.device(self.world.device).index] if self.world.device.startswith("cuda") else None
        # the spelling buffers of the rnn model never change: no broadcast of them at every step
        self.ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
        self.needs_every_backward = True
        return self.ddp

    def warm_up(self, device):
        if device.type == "cpu":
            cpu_kernel.warm_up_rows()

    def before_step(self, step, first_step, signal_number):
        return 0  # agreed within the step

    def window_step(self, local_step, model, window, lr, max_windows, signal_number):
        *stats, stop = sync_window_step(model, *window, lr, max_windows, signal_number)
        return stats, stop

    def uneven_steps(self, train_model):
        return Join([self.agreement, self.ddp]) if self.ddp is not None else contextlib.nullcontext()

    def steps_to_run(self, n_steps, my_steps):
        return my_steps if self.ddp is not None else n_steps

    def agree_on_batch(self, n_local, signal_number):
        return self.agreement.exchange(n_local, signal_number)

    def loss_weight(self, n_local, n_global):
        share = n_local / max(n_global, 1)
        return share * self.world_size if self.ddp is not None else share  # DDP averages over ranks

    def reduce_gradients(self, model, n_local):
        if self.ddp is None:
            sum_sparse_gradients(model)

    def agree_at_epoch_end(self, stop):
        """Ranks that left a join() early meet the others again here, and learn of a stop."""
        if self.ddp is None:
            return stop
        return int(_all_gather_numbers(stop)[:, 0].max())


class AsyncRanks(OneProcess):
    """--multi-node --async: local steps; every sync_interval steps the ranks' changes are
    exchanged in the background (Averager), and every epoch ends with a blocking exchange, so
    the PIP loss and checkpoints see identical parameters on all ranks. A stop asked for
    between two sync points is agreed at the next one but one."""

    def __init__(self, world, sync_interval, block_momentum):
        super().__init__()
        self.rank, self.world_size = world.rank, world.world_size
        self.sync_interval, self.block_momentum = sync_interval, block_momentum
        self.averager = None
        self.hinted = False

    def warm_up(self, device):
        if device.type == "cpu":
            cpu_kernel.warm_up_exchange()

    def start_epoch(self, model):
        self.averager = Averager(model, self.block_momentum)  # each epoch starts from a consensus

    def end_epoch(self, stop):
        self.averager.finish()
        if not stop:
            self._hint_once()
        return stop

    def before_step(self, step, first_step, signal_number):
        if step > first_step and step % self.sync_interval == 0:
            return self.averager.sync_point(signal_number)
        return 0

    def next_sync_point(self, step):
        return (step // self.sync_interval + 1) * self.sync_interval

    def window_step(self, local_step, model, window, lr, max_windows, signal_number):
        return local_step(*window, lr), 0

    def agree_on_batch(self, n_local, signal_number):
        return n_local, 0

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
    return AsyncRanks(world, args.sync_interval, args.block_momentum)


def interval_hint(share, interval):
    """What rank 0 says when an --async epoch spent share of its time at sync points, or None."""
    if share < EXCHANGE_HINT_SHARE:
        return None
    return (f"note: this epoch spent {share:.0%} of its time exchanging with the other ranks (all the parameters "
            f"every --sync-interval {interval} steps); a larger --sync-interval trains faster, at some cost in word "
            "similarity (README: Several GPUs and machines)")


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
    are dropped. The all-reduce's CPU time drops with its bytes (bench/bench_distributed.py).

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
        consensus. On the CPU a compiled loop does it in one pass over the rows (cpu_kernel.exchange_rows),
        where the tensor ops pass over whole tables a dozen times, all memory traffic."""
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
        flags.copy_((progress.amax(dim=1) != 0) | (progress.amin(dim=1) != 0))  # cheaper than any() over each row
        total = progress.add_(unsent.float())
        changes.copy_(total)
        unsent.copy_(total - changes.float())
        torch.add(consensus, total, out=values)
        sent_from.copy_(values)
