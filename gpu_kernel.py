"""The sgns SGD step on whole windows (model.SGNS.window_step) as three Triton kernels, for CUDA GPUs.

The tensor version of the step is about 35 kernels, most of them small element-wise passes; on
a GPU at batch 8192 it is limited by their count, not by the memory it moves. Here, one program
per window: a first kernel tallies how often each row is met, a second gathers the window's rows,
computes its scores, loss and gradients (scaled by the row cap and the learning rate) and writes
the gradients, a third adds them to the tables. Keeping the gradients apart from their updates
keeps the step's meaning: every gradient comes from the weights before the step, as in the
tensor version, which the tests compare it with (Triton's interpreter runs these on the CPU).

Triton ships with CUDA builds of torch on Linux and compiles on first use (it needs a C compiler
then); usable() says whether it works here, and engines.choose_window_step falls back to tensor ops if not.
"""
import contextlib
import functools

import torch
import triton
import triton.language as tl

CHUNK = 64  # embedding columns a program holds at a time: registers stay bounded whatever the dimension
# Triton compiles a variant per 16-byte alignment of each pointer; a step's windows and lr are slices
# at any offset, and a variant first met mid-run would cost its compile inside an epoch
SLICED = ["context_ids", "weight", "out_ids", "lr"]


@triton.jit(do_not_specialize_on_alignment=SLICED[:3])
def _tally_rows(context_ids, weight, out_ids, tally, vocab_size,
                W2: tl.constexpr, K1: tl.constexpr, BW: tl.constexpr, BO: tl.constexpr):
    """tally[row] += the window's real pairs of in-row `row`; tally[V + row] += 1 per out slot holding `row`."""
    window = tl.program_id(0).to(tl.int64)
    slot_w, slot_o = tl.arange(0, BW), tl.arange(0, BO)
    context = tl.load(context_ids + window * W2 + slot_w, mask=slot_w < W2, other=0)
    pair = tl.load(weight + window * W2 + slot_w, mask=slot_w < W2, other=0.0)
    tl.atomic_add(tally + context, pair, mask=(slot_w < W2) & (pair != 0), sem="relaxed")
    out = tl.load(out_ids + window * K1 + slot_o, mask=slot_o < K1, other=0)
    tl.atomic_add(tally + vocab_size + out, tl.full([BO], 1.0, tl.float32), mask=slot_o < K1, sem="relaxed")


@triton.jit(do_not_specialize_on_alignment=SLICED)
def _window_grads(in_w, out_w, context_ids, weight, out_ids, tally, lr, in_grads, out_grads, stats,
                  vocab_size, cap, dim, W2: tl.constexpr, K1: tl.constexpr, BW: tl.constexpr, BO: tl.constexpr,
                  CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr):
    """One window's update rows, -lr x min(1, cap / tally) x gradient, and its loss and real pairs into stats."""
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
    step = -tl.load(lr)
    # min(1, cap / k) as cap / max(k, cap): a padding slot's row may tally 0 (its coef is 0 anyway)
    in_tally = tl.load(tally + context, mask=w_ok, other=0.0)
    out_tally = tl.load(tally + vocab_size + out, mask=o_ok, other=0.0)
    coef_in = coef * (step * cap / tl.maximum(in_tally, cap))[:, None]
    coef_out = coef * (step * cap / tl.maximum(out_tally, cap))[None, :]
    for chunk in range(N_CHUNKS):
        cols = chunk * CHUNK + col
        col_ok = (cols < dim)[None, :]
        inputs = tl.load(in_w + context[:, None] * dim + cols[None, :], mask=w_ok[:, None] & col_ok, other=0.0)
        outputs = tl.load(out_w + out[:, None] * dim + cols[None, :], mask=o_ok[:, None] & col_ok, other=0.0)
        tl.store(in_grads + (window * W2 + slot_w)[:, None] * dim + cols[None, :],
                 tl.dot(coef_in, outputs, input_precision="ieee"), mask=w_ok[:, None] & col_ok)
        tl.store(out_grads + (window * K1 + slot_o)[:, None] * dim + cols[None, :],
                 tl.dot(tl.trans(coef_out), inputs, input_precision="ieee"), mask=o_ok[:, None] & col_ok)


@triton.jit(do_not_specialize_on_alignment=SLICED[:3])
def _add_grads(in_w, out_w, context_ids, weight, out_ids, in_grads, out_grads, dim,
               W2: tl.constexpr, K1: tl.constexpr, BW: tl.constexpr, BO: tl.constexpr,
               CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr):
    """Adds one window's update rows to the tables (padding slots, whose rows are zero, skipped)."""
    window = tl.program_id(0).to(tl.int64)
    slot_w, slot_o, col = tl.arange(0, BW), tl.arange(0, BO), tl.arange(0, CHUNK)
    pair = tl.load(weight + window * W2 + slot_w, mask=slot_w < W2, other=0.0)
    w_ok, o_ok = (slot_w < W2) & (pair != 0), slot_o < K1
    context = tl.load(context_ids + window * W2 + slot_w, mask=w_ok, other=0)
    out = tl.load(out_ids + window * K1 + slot_o, mask=o_ok, other=0)
    for chunk in range(N_CHUNKS):
        cols = chunk * CHUNK + col
        col_ok = (cols < dim)[None, :]
        grads = tl.load(in_grads + (window * W2 + slot_w)[:, None] * dim + cols[None, :], mask=w_ok[:, None] & col_ok)
        tl.atomic_add(in_w + context[:, None] * dim + cols[None, :], grads, mask=w_ok[:, None] & col_ok, sem="relaxed")
        grads = tl.load(out_grads + (window * K1 + slot_o)[:, None] * dim + cols[None, :], mask=o_ok[:, None] & col_ok)
        tl.atomic_add(out_w + out[:, None] * dim + cols[None, :], grads, mask=o_ok[:, None] & col_ok, sem="relaxed")


def window_step(in_weight, out_weight, context_ids, weight, out_ids, lr, cap):
    """model.SGNS.window_step's update on the tables in place; returns [loss summed over the real pairs, their count].

    context_ids, weight C x W2 and out_ids C x (K+1) as there (contiguous, on the tables' device);
    lr a number or a 0-d tensor on the device (a captured CUDA graph reads it there); a row met
    k times (weighted by real pairs) moves by min(1, cap / k) times its summed gradient.
    """
    n_windows, w2 = context_ids.shape
    k1 = out_ids.shape[1]
    vocab_size, dim = in_weight.shape
    device = in_weight.device
    counts = torch.zeros(2 * vocab_size + 2, device=device)  # in-row tally, out-row tally, then loss and pairs
    tally, stats = counts[:2 * vocab_size], counts[2 * vocab_size:]
    lr = lr.reshape(1) if torch.is_tensor(lr) else torch.full((1,), lr, device=device)
    if n_windows == 0:
        return stats
    in_grads = torch.empty(n_windows * w2, dim, device=device)
    out_grads = torch.empty(n_windows * k1, dim, device=device)
    shape = dict(W2=w2, K1=k1, BW=max(16, triton.next_power_of_2(w2)), BO=max(16, triton.next_power_of_2(k1)))
    columns = dict(CHUNK=CHUNK, N_CHUNKS=triton.cdiv(dim, CHUNK))
    with _on(device):
        _tally_rows[(n_windows,)](context_ids, weight, out_ids, tally, vocab_size, **shape)
        _window_grads[(n_windows,)](in_weight, out_weight, context_ids, weight, out_ids, tally, lr, in_grads,
                                    out_grads, stats, vocab_size, float(cap), dim, **shape, **columns)
        _add_grads[(n_windows,)](in_weight, out_weight, context_ids, weight, out_ids, in_grads, out_grads, dim,
                                 **shape, **columns)
    return stats


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
        window_step(tables[0], tables[1], ids, torch.ones(1, 2, device=device), ids, 0.0, 1)
        torch.cuda.synchronize(device)
        return True
    except Exception as err:  # noqa: BLE001 - any failure to build or launch means: use the tensor step
        print(f"warning: the Triton window step does not run here ({str(err).splitlines()[0] if str(err) else err!r}); "
              "training with tensor ops")
        return False
