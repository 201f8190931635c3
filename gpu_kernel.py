"""The sgns SGD step on whole windows (model.SGNS.window_step) as Triton kernels, for CUDA GPUs.

The tensor version of the step is about 35 kernels, most of them small element-wise passes; on
a GPU at batch 8192 it is limited by their count, not by the memory it moves. Here the step's
two phases (engines.WindowStep) take three kernels. window_rows: one program per window gathers
its rows, computes its scores, loss and gradients and writes one packed row per slot
([gradient | key | key | uses], model.Rows). apply_rows: a first kernel tallies how often each
row is met, a second adds each packed row, scaled by the row cap and the learning rate, to its
table. Between the two a --sync run exchanges the rows, so the cap counts a row over all ranks.
Keeping the gradients apart from their updates keeps the step's meaning: every gradient comes
from the weights before the step, as in the tensor version, which the tests compare it with
(Triton's interpreter runs these on the CPU).

Triton ships with CUDA builds of torch on Linux and compiles on first use (it needs a C compiler
then); usable() says whether it works here, and engines.choose_window_step falls back to tensor ops if not.
"""
import contextlib
import functools

import torch
import triton
import triton.language as tl

from tables import KEY_SPLIT

CHUNK = 64  # embedding columns a program holds at a time: registers stay bounded whatever the dimension
ROWS_PER_PROGRAM = 16  # packed rows one program of apply_rows' kernels takes
# Triton compiles a variant per 16-byte alignment of each pointer; a step's windows and lr are slices
# at any offset, and a variant first met mid-run would cost its compile inside an epoch
SLICED = ["context_ids", "weight", "out_ids", "lr"]


@triton.jit(do_not_specialize_on_alignment=SLICED[:3])
def _window_rows(in_w, out_w, context_ids, weight, out_ids, packed, stats, vocab_size, dim, key_split,
                 W2: tl.constexpr, K1: tl.constexpr, BW: tl.constexpr, BO: tl.constexpr,
                 CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr):
    """One window's packed rows, its W2 context slots then its K1 out slots, and its loss and real pairs into stats."""
    window = tl.program_id(0).to(tl.int64)
    slot_w, slot_o, col = tl.arange(0, BW), tl.arange(0, BO), tl.arange(0, CHUNK)
    w_ok, o_ok = slot_w < W2, slot_o < K1
    context = tl.load(context_ids + window * W2 + slot_w, mask=w_ok, other=0)
    pair = tl.load(weight + window * W2 + slot_w, mask=w_ok, other=0.0)
    out = tl.load(out_ids + window * K1 + slot_o, mask=o_ok, other=0)
    scores = tl.zeros([BW, BO], dtype=tl.float32)
    for chunk in range(N_CHUNKS):
        cols = chunk * CHUNK + col
        inputs = tl.load(in_w + context[:, None] * dim + cols[None, :], mask=w_ok[:, None] & (cols < dim)[None, :],
                         other=0.0)
        outputs = tl.load(out_w + out[:, None] * dim + cols[None, :], mask=o_ok[:, None] & (cols < dim)[None, :],
                          other=0.0)
        scores += tl.dot(inputs, tl.trans(outputs), input_precision="ieee")
    label = (slot_o == 0).to(tl.float32)[None, :]  # the center's out row is the positive, the rest negatives
    real = w_ok[:, None] & o_ok[None, :]
    # binary cross-entropy with logits: -log s(x) for the positive, -log s(-x) for a negative
    softplus = tl.maximum(scores, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(scores)))
    loss = tl.where(real, (softplus - label * scores) * pair[:, None], 0.0)
    tl.atomic_add(stats, tl.sum(tl.sum(loss, axis=1), axis=0), sem="relaxed")
    tl.atomic_add(stats + 1, tl.sum(pair, axis=0), sem="relaxed")
    coef = tl.where(real, (tl.sigmoid(scores) - label) * pair[:, None], 0.0)  # d loss / d score
    width = dim + 3
    in_row = (window * (W2 + K1) + slot_w) * width  # where each slot's packed row starts
    out_row = (window * (W2 + K1) + W2 + slot_o) * width
    for chunk in range(N_CHUNKS):
        cols = chunk * CHUNK + col
        col_ok = (cols < dim)[None, :]
        inputs = tl.load(in_w + context[:, None] * dim + cols[None, :], mask=w_ok[:, None] & col_ok, other=0.0)
        outputs = tl.load(out_w + out[:, None] * dim + cols[None, :], mask=o_ok[:, None] & col_ok, other=0.0)
        tl.store(packed + in_row[:, None] + cols[None, :], tl.dot(coef, outputs, input_precision="ieee"),
                 mask=w_ok[:, None] & col_ok)
        tl.store(packed + out_row[:, None] + cols[None, :], tl.dot(tl.trans(coef), inputs, input_precision="ieee"),
                 mask=o_ok[:, None] & col_ok)
    out_key = out + vocab_size
    tl.store(packed + in_row + dim, (context // key_split).to(tl.float32), mask=w_ok)
    tl.store(packed + in_row + dim + 1, (context % key_split).to(tl.float32), mask=w_ok)
    tl.store(packed + in_row + dim + 2, pair, mask=w_ok)
    tl.store(packed + out_row + dim, (out_key // key_split).to(tl.float32), mask=o_ok)
    tl.store(packed + out_row + dim + 1, (out_key % key_split).to(tl.float32), mask=o_ok)
    tl.store(packed + out_row + dim + 2, tl.full([BO], 1.0, tl.float32), mask=o_ok)


@triton.jit
def _packed_keys(packed, dim, key_split, n_rows, ROWS: tl.constexpr):
    """The keys and uses of one program's packed rows, and which of them carry a gradient."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    ok = rows < n_rows
    at = packed + rows * (dim + 3) + dim
    keys = tl.load(at, mask=ok, other=0.0).to(tl.int64) * key_split + tl.load(at + 1, mask=ok, other=0.0).to(tl.int64)
    uses = tl.load(at + 2, mask=ok, other=0.0)
    return rows, keys, uses, ok & (uses != 0)  # a padding slot (no real pair) has a zero gradient


@triton.jit
def _tally_rows(packed, tally, dim, key_split, n_rows, ROWS: tl.constexpr):
    """tally[key] += uses of each packed row."""
    _, keys, uses, used = _packed_keys(packed, dim, key_split, n_rows, ROWS)
    tl.atomic_add(tally + keys, uses, mask=used, sem="relaxed")


@triton.jit(do_not_specialize_on_alignment=SLICED[3:])
def _add_rows(in_w, out_w, packed, tally, lr, vocab_size, cap, dim, key_split, n_rows, ROWS: tl.constexpr,
              CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr):
    """Adds -lr x min(1, cap / tally[key]) x gradient of each packed row to its table's row."""
    rows, keys, _, used = _packed_keys(packed, dim, key_split, n_rows, ROWS)
    # min(1, cap / k) as cap / max(k, cap)
    factor = -tl.load(lr) * cap / tl.maximum(tl.load(tally + keys, mask=used, other=cap), cap)
    is_in = keys < vocab_size
    in_row = tl.where(is_in, keys, 0)[:, None] * dim
    out_row = tl.where(is_in, 0, keys - vocab_size)[:, None] * dim
    col = tl.arange(0, CHUNK)
    for chunk in range(N_CHUNKS):
        cols = chunk * CHUNK + col
        ok = used[:, None] & (cols < dim)[None, :]
        step = tl.load(packed + rows[:, None] * (dim + 3) + cols[None, :], mask=ok, other=0.0) * factor[:, None]
        tl.atomic_add(in_w + in_row + cols[None, :], step, mask=ok & is_in[:, None], sem="relaxed")
        tl.atomic_add(out_w + out_row + cols[None, :], step, mask=ok & ~is_in[:, None], sem="relaxed")


def _columns(dim):
    return dict(CHUNK=CHUNK, N_CHUNKS=triton.cdiv(dim, CHUNK))


def window_rows(in_weight, out_weight, context_ids, weight, out_ids):
    """The step's first phase (model.SGNS.window_rows): (packed rows, one a slot, [loss sum, real pairs]).

    context_ids, weight C x W2 and out_ids C x (K+1) as model.SGNS.window_step takes them
    (contiguous, on the tables' device).
    """
    n_windows, w2 = context_ids.shape
    k1 = out_ids.shape[1]
    vocab_size, dim = in_weight.shape
    device = in_weight.device
    packed = torch.empty(n_windows * (w2 + k1), dim + 3, device=device)
    stats = torch.zeros(2, device=device)
    if n_windows:
        shape = dict(W2=w2, K1=k1, BW=max(16, triton.next_power_of_2(w2)), BO=max(16, triton.next_power_of_2(k1)))
        with _on(device):
            _window_rows[(n_windows,)](in_weight, out_weight, context_ids, weight, out_ids, packed, stats, vocab_size,
                                       dim, KEY_SPLIT, **shape, **_columns(dim))
    return packed, stats


def apply_rows(in_weight, out_weight, packed, segments, lr, cap):
    """The step's second phase (model.SGNS.apply_rows): SGD from the packed rows (those of segments,
    or all), a row met k times over all of them (weighted by real pairs) moving by min(1, cap / k)
    times its summed gradient. lr a number or a 0-d tensor on the device (a captured CUDA graph reads it there)."""
    if segments is not None:
        packed = torch.cat([packed[a:b] for a, b in segments])
    vocab_size, dim = in_weight.shape
    device = in_weight.device
    lr = lr.reshape(1) if torch.is_tensor(lr) else torch.full((1,), lr, device=device)
    tally = torch.zeros(2 * vocab_size, device=device)
    n_rows = len(packed)
    if not n_rows:
        return
    grid = (triton.cdiv(n_rows, ROWS_PER_PROGRAM),)
    with _on(device):
        _tally_rows[grid](packed, tally, dim, KEY_SPLIT, n_rows, ROWS=ROWS_PER_PROGRAM)
        _add_rows[grid](in_weight, out_weight, packed, tally, lr, vocab_size, float(cap), dim, KEY_SPLIT, n_rows,
                        ROWS=ROWS_PER_PROGRAM, **_columns(dim))


def _on(device):
    """Triton launches on the current CUDA device, whatever the tensors' device: make it theirs. Only
    when it is another: switching there and back costs every eager step time (the trainer sets the run's GPU)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


@functools.lru_cache(maxsize=None)
def usable(device):
    """Whether the kernels compile and run on this CUDA device (a driver, Triton and a C compiler are
    needed); says why once if not."""
    try:
        tables = torch.zeros(2, 4, 8, device=device)
        ids = torch.zeros(1, 2, dtype=torch.int64, device=device)
        packed, _ = window_rows(tables[0], tables[1], ids, torch.ones(1, 2, device=device), ids)
        apply_rows(tables[0], tables[1], packed, None, 0.0, 1)
        torch.cuda.synchronize(device)
        return True
    except Exception as err:  # noqa: BLE001 - any failure to build or launch means: use the tensor step
        print(f"warning: the Triton window step does not run here ({str(err).splitlines()[0] if str(err) else err!r}); "
              "training with tensor ops")
        return False
