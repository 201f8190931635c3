"""Compiled CPU training kernel: word2vec's SGD loop, several threads on shared tables (and the
row pass of --async's exchange, exchange_rows; the per-row sums and updates of the torch engine's
batched steps, TouchedRows).

Python would spend more time dispatching than computing on 100-float rows, so the hot
loop (windows, negatives, dot products, row updates) is compiled with numba. Threads
update the two tables without locks (Hogwild, Recht et al. 2011), as word2vec and gensim
do: collisions are rare because each thread works on a distant part of the corpus, except on the
most frequent words' rows, which each thread trains a copy of (HotRows).
Every random draw of a training step comes from a generator seeded from (seed, epoch, rank,
step), so with one thread a run is exactly reproducible, however its steps are grouped.

The loop is word2vec's skip-gram: for each word of a sentence, its context words' input rows are
trained against the word's output row and negatives. The negatives are drawn once per word and
shared by its context window, and the window is one HogBatch step (Ji et al., "Parallelizing
Word2Vec in Shared and Distributed Memory", 2016): every pair's step is computed from the rows as
they were before the window, then all are applied, which is exactly -lr times the gradient of the
window's summed loss. Pair by pair, the center's and the negatives' output rows would move after
each context word, and the next context word would get a smaller step: the window would damp
itself (bench/RESULTS.md, the pWord2Vec study). The same few rows stay in cache for the whole
window.
"""
import functools
import math

import numba
import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from tables import KEY_SPLIT


def _prefer_512_bit_vectors():
    """Let LLVM vectorise the row loops with 512-bit vectors on AVX-512 CPUs: it keeps to 256-bit
    ones there by default (a tuning for the first AVX-512 chips, which slowed their clock on wide
    work), and the kernel's passes over the rows run faster on the wider ones (bench/RESULTS.md).
    Numba reads the CPU features when it first compiles or loads a kernel, so this runs at import;
    features the user chose (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES) are left alone."""
    if numba.config.CPU_NAME is not None or numba.config.CPU_FEATURES is not None:
        return
    try:
        features = llvm.get_host_cpu_features()
    except RuntimeError:  # LLVM cannot list this CPU's features: numba's defaults stand
        return
    if features.get("avx512f"):
        numba.config.CPU_FEATURES = features.flatten() + ",-prefer-256-bit"


_prefer_512_bit_vectors()

_LCG_MUL = np.uint64(25214903917)  # word2vec's linear congruential generator
_LCG_ADD = np.uint64(11)


@intrinsic
def _prefetch(typingctx, table, row, col):
    """Ask the CPU to start bringing the cache line of table[row, col] into its caches (LLVM's
    prefetch: for reading, kept in every cache level); the loop goes on meanwhile."""
    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        address = cgutils.get_item_pointer(context, builder, array_type, array, [args[1], args[2]])
        byte_pointer, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        prefetch = builder.module.declare_intrinsic(  # llvmlite names it for this LLVM's pointer types
            "llvm.prefetch", [byte_pointer], ir.FunctionType(ir.VoidType(), [byte_pointer, i32, i32, i32]))
        builder.call(prefetch, [builder.bitcast(address, byte_pointer), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()
    return types.void(table, types.int64, types.int64), codegen


@njit(inline="always")
def _prefetch_row(table, row):
    """Prefetch every cache line (16 float32) of table[row]."""
    for t in range(0, table.shape[1], 16):
        _prefetch(table, row, t)


@njit(inline="always")
def _lcg(state):
    return state * _LCG_MUL + _LCG_ADD


@njit(inline="always")
def _below(state, n):
    """An integer in [0, n) from the top 32 bits of the state, by a multiplication (Lemire's
    range reduction) where a modulo would cost an integer division."""
    return np.int64(((state >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32))


@njit(inline="always")
def _uniform(state):
    """A float in [0, 1) from the top 24 bits of the state."""
    return np.float32((state >> np.uint64(40)) * (1.0 / 16777216.0))


@njit(inline="always")
def _softplus(x):
    """log(1 + exp(x)) without overflow: the SGNS loss of one score."""
    if x > 0:
        return x + math.log1p(math.exp(-x))
    return math.log1p(math.exp(x))


LANES = 16
F32 = ir.FloatType()
VEC = ir.VectorType(F32, LANES)
I1V = ir.VectorType(ir.IntType(1), LANES)
I32 = ir.IntType(32)
I64 = ir.IntType(64)


def _row_ptr(context, builder, aryty, ary_val, row):
    ary = context.make_array(aryty)(context, builder, ary_val)
    return cgutils.get_item_pointer(context, builder, aryty, ary, [row, ir.Constant(I64, 0)])


def _declare(builder, name, ret, args):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _masked_load(builder, ptr, mask):
    fn = _declare(builder, "llvm.masked.load.v16f32.p0", VEC, [ptr.type, I32, I1V, VEC])
    return builder.call(fn, [ptr, I32(4), mask, ir.Constant(VEC, [0.0] * LANES)])


def _masked_store(builder, value, ptr, mask):
    fn = _declare(builder, "llvm.masked.store.v16f32.p0", ir.VoidType(),
                  [VEC, ptr.type, I32, I1V])
    builder.call(fn, [value, ptr, I32(4), mask])


def _tail_mask(builder, remaining):
    lanes = ir.Constant(ir.VectorType(I64, LANES), list(range(LANES)))
    return builder.icmp_unsigned("<", lanes, _splat(builder, remaining, ir.VectorType(I64, LANES)))


def _vec_ptr(builder, ptr, t):
    return builder.bitcast(builder.gep(ptr, [t]), VEC.as_pointer())


def _over_blocks(builder, dim, body):
    """body(t, mask or None) for every block of 16 columns of a row of dim, the last one masked."""
    full = builder.and_(dim, I64(~(LANES - 1)))
    with cgutils.for_range_slice(builder, I64(0), full, I64(LANES)) as (t, _):
        body(t, None)
    rest = builder.sub(dim, full)
    with builder.if_then(builder.icmp_signed(">", rest, I64(0))):
        body(full, _tail_mask(builder, rest))


def _load(builder, ptr, t, mask):
    if mask is None:
        return builder.load(_vec_ptr(builder, ptr, t), align=4)
    return _masked_load(builder, _vec_ptr(builder, ptr, t), mask)


def _store(builder, value, ptr, t, mask):
    if mask is None:
        builder.store(value, _vec_ptr(builder, ptr, t), align=4)
    else:
        _masked_store(builder, value, _vec_ptr(builder, ptr, t), mask)


def _fma(builder, a, b, c):
    fn = _declare(builder, "llvm.fma.v16f32", VEC, [VEC, VEC, VEC])
    return builder.call(fn, [a, b, c])


def _splat(builder, scalar, vector_type=VEC):
    """A vector of vector_type with scalar in every lane."""
    first = builder.insert_element(ir.Constant(vector_type, ir.Undefined), scalar, I32(0))
    return builder.shuffle_vector(first, ir.Constant(vector_type, ir.Undefined),
                                  ir.Constant(ir.VectorType(I32, LANES), [0] * LANES))


def _reduce(builder, vec):
    fn = _declare(builder, "llvm.vector.reduce.fadd.v16f32", F32, [F32, VEC])
    return builder.call(fn, [F32(-0.0), vec], fastmath=("reassoc",))


def _item(context, builder, aryty, ary_val, *indices):
    """The value of ary[indices] (indices: LLVM int64 values)."""
    ary = context.make_array(aryty)(context, builder, ary_val)
    return builder.load(cgutils.get_item_pointer(context, builder, aryty, ary, list(indices)))


def _offsets(builder, start, count):
    return [builder.add(start, I64(k)) for k in range(count)]


@intrinsic
def _dots_into(typingctx, coef, o, j, out_w, out_row, in_w, in_ids, count):
    """coef[o, j + k] <- out_w[out_row] . in_w[in_ids[j + k]] for k < count (a literal): one
    pass over the rows, a vector accumulator per dot product."""
    if not isinstance(count, types.IntegerLiteral):
        return None  # numba then types the call again with the count as a literal
    n = count.literal_value
    sig = types.void(coef, types.int64, types.int64, out_w, types.int64, in_w, in_ids, count)

    def codegen(context, builder, signature, args):
        coef_ty, _, _, out_ty, _, in_ty, ids_ty, _ = signature.args
        out_ptr = _row_ptr(context, builder, out_ty, args[3], args[4])
        in_ptrs = [_row_ptr(context, builder, in_ty, args[5], _item(context, builder, ids_ty, args[6], jk))
                   for jk in _offsets(builder, args[2], n)]
        accs = [cgutils.alloca_once_value(builder, ir.Constant(VEC, [0.0] * LANES)) for _ in range(n)]

        def body(t, mask):
            x = _load(builder, out_ptr, t, mask)
            for k in range(n):
                builder.store(_fma(builder, x, _load(builder, in_ptrs[k], t, mask), builder.load(accs[k])), accs[k])
        _over_blocks(builder, _row_width(context, builder, in_ty, args[5]), body)
        coef_ary = context.make_array(coef_ty)(context, builder, args[0])
        for k, jk in enumerate(_offsets(builder, args[2], n)):
            cell = cgutils.get_item_pointer(context, builder, coef_ty, coef_ary, [args[1], jk])
            builder.store(_reduce(builder, builder.load(accs[k])), cell)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _add_into(typingctx, dst, dst_row, src, src_ids, k0, coef, fixed, along_rows, count, assign):
    """dst[dst_row] (+)= sum_k c_k src[src_ids[k0 + k]] for k < count (a literal), where c_k is
    coef[k0 + k, fixed] if along_rows else coef[fixed, k0 + k]; assign (a literal) overwrites
    dst[dst_row] instead of adding to it. One pass over the rows."""
    if not all(isinstance(arg, types.Literal) for arg in (along_rows, count, assign)):
        return None  # numba then types the call again with them as literals
    n, down, overwrite = count.literal_value, along_rows.literal_value, assign.literal_value
    sig = types.void(dst, types.int64, src, src_ids, types.int64, coef, types.int64, along_rows, count, assign)

    def codegen(context, builder, signature, args):
        dst_ty, _, src_ty, ids_ty, _, coef_ty = signature.args[:6]
        dst_ptr = _row_ptr(context, builder, dst_ty, args[0], args[1])
        ks = _offsets(builder, args[4], n)
        src_ptrs = [_row_ptr(context, builder, src_ty, args[2], _item(context, builder, ids_ty, args[3], k))
                    for k in ks]
        coefs = [_splat(builder, _item(context, builder, coef_ty, args[5], *((k, args[6]) if down else (args[6], k))))
                 for k in ks]

        def body(t, mask):
            acc = ir.Constant(VEC, [0.0] * LANES) if overwrite else _load(builder, dst_ptr, t, mask)
            for k in range(n):
                acc = _fma(builder, coefs[k], _load(builder, src_ptrs[k], t, mask), acc)
            _store(builder, acc, dst_ptr, t, mask)
        _over_blocks(builder, _row_width(context, builder, dst_ty, args[0]), body)
        return context.get_dummy_value()
    return sig, codegen


def _row_width(context, builder, aryty, ary_val):
    return builder.extract_value(context.make_array(aryty)(context, builder, ary_val).shape, 1)


# Rows a pass takes at most: the windows' usual sizes (2 to 10 context words, 6 or 11 output rows)
# in few passes, each pass one read of the row the others meet.
@njit(inline="always")
def _chunk(left):
    return 8 if left >= 8 else 6 if left >= 6 else 4 if left >= 4 else 2 if left >= 2 else 1


@njit(inline="always")
def _scores(in_w, out_w, in_ids, n_in, out_ids, n_out, coef):
    """coef[o, j] <- out_w[out_ids[o]] . in_w[in_ids[j]], several input rows a pass."""
    for o in range(n_out):
        out_row = out_ids[o]
        j = 0
        while j < n_in:
            size = _chunk(n_in - j)
            if size == 8:
                _dots_into(coef, o, j, out_w, out_row, in_w, in_ids, 8)
            elif size == 6:
                _dots_into(coef, o, j, out_w, out_row, in_w, in_ids, 6)
            elif size == 4:
                _dots_into(coef, o, j, out_w, out_row, in_w, in_ids, 4)
            elif size == 2:
                _dots_into(coef, o, j, out_w, out_row, in_w, in_ids, 2)
            else:
                _dots_into(coef, o, j, out_w, out_row, in_w, in_ids, 1)
            j += size


@njit(inline="always")
def _steps_from_scores(coef, n_in, n_out, lr, with_loss):
    """Each score becomes its pair's step size, lr (label - s(score)) (label 1 for out_ids[0], the
    center; 0 for a negative); returns the pairs' summed loss if with_loss, else 0."""
    loss = 0.0
    one, rate = np.float32(1.0), np.float32(lr)
    for o in range(n_out):
        for j in range(n_in):
            score = coef[o, j]
            if with_loss:
                loss += _softplus(-score) if o == 0 else _softplus(score)
            prob = one / (one + math.exp(-score))  # float32: expf, not exp
            coef[o, j] = rate * (one - prob) if o == 0 else -rate * prob
    return loss


@njit(inline="always")
def _input_steps(out_w, out_ids, n_out, n_in, coef, in_delta):
    """in_delta[j] <- sum_o coef[o, j] out_w[out_ids[o]], several output rows a pass."""
    for j in range(n_in):
        o = 0
        while o < n_out:
            size = _chunk(n_out - o)
            if o == 0:
                _add_rows_into(in_delta, j, out_w, out_ids, o, coef, j, True, size, True)
            else:
                _add_rows_into(in_delta, j, out_w, out_ids, o, coef, j, True, size, False)
            o += size


@njit(inline="always")
def _add_rows_into(dst, dst_row, src, src_ids, k0, coef, fixed, along_rows, size, assign):
    """_add_into with the run-time size (8, 6, 4, 2 or 1) as its literal count."""
    if size == 8:
        _add_into(dst, dst_row, src, src_ids, k0, coef, fixed, along_rows, 8, assign)
    elif size == 6:
        _add_into(dst, dst_row, src, src_ids, k0, coef, fixed, along_rows, 6, assign)
    elif size == 4:
        _add_into(dst, dst_row, src, src_ids, k0, coef, fixed, along_rows, 4, assign)
    elif size == 2:
        _add_into(dst, dst_row, src, src_ids, k0, coef, fixed, along_rows, 2, assign)
    else:
        _add_into(dst, dst_row, src, src_ids, k0, coef, fixed, along_rows, 1, assign)


@njit(inline="always")
def _output_steps(in_w, in_ids, n_in, out_w, out_ids, n_out, coef):
    """out_w[out_ids[o]] += sum_j coef[o, j] in_w[in_ids[j]], several input rows a pass. A row
    listed twice gets both steps, each from the input rows as they are (not yet moved)."""
    for o in range(n_out):
        out_row = out_ids[o]
        j = 0
        while j < n_in:
            size = _chunk(n_in - j)
            _add_rows_into(out_w, out_row, in_w, in_ids, j, coef, o, False, size, False)
            j += size


@intrinsic
def _add_row(typingctx, dst, dst_row, src, src_row):
    """dst[dst_row] += src[src_row], one pass."""
    sig = types.void(dst, types.int64, src, types.int64)

    def codegen(context, builder, signature, args):
        dst_ptr = _row_ptr(context, builder, signature.args[0], args[0], args[1])
        src_ptr = _row_ptr(context, builder, signature.args[2], args[2], args[3])

        def body(t, mask):
            _store(builder, builder.fadd(_load(builder, dst_ptr, t, mask), _load(builder, src_ptr, t, mask)),
                   dst_ptr, t, mask)
        _over_blocks(builder, _row_width(context, builder, signature.args[0], args[0]), body)
        return context.get_dummy_value()
    return sig, codegen


@njit(inline="always")
def _add_rows(table, row_ids, n, delta):
    """table[row_ids[j]] += delta[j] for j < n (a row listed twice gets both)."""
    for j in range(n):
        _add_row(table, row_ids[j], delta, j)


@njit(inline="always")
def _alias_draw(state, accept, alias):
    """One draw from the alias table (Walker): a uniform slot, kept with its acceptance
    probability, else its alias; returns (state, word)."""
    state = _lcg(state)
    slot = _below(state, accept.shape[0])
    state = _lcg(state)
    return state, (np.int64(slot) if _uniform(state) < accept[slot] else alias[slot])


@njit(fastmath=True, nogil=True, cache=True, error_model="numpy")
def window_step(in_w, out_w, in_ids, n_in, out_ids, n_out, lr, coef, in_delta, with_loss):
    """One window's SGD step, HogBatch (Ji et al. 2016): the input rows in_ids[:n_in] (the
    context words) each against the output rows out_ids[:n_out] (the center, then its
    negatives), every step computed from the rows as they were before the window, then applied.
    That is exactly -lr times the gradient of the window's summed loss, duplicates included.

    Returns the summed loss -log s(i.c) - sum_n log s(-i.n) of its pairs if with_loss, else 0.
    coef (n_out x n_in at least) and in_delta (n_in x d at least) are scratch. Rows are indexed
    in place, never sliced: a slice is a reference-counted object, and threads counting
    references on the same table contend on one cache line. Row numbers and step sizes are read
    into locals before each loop over a row: a store into a table might alias them, and numba
    would otherwise load them again at every element.
    """
    _scores(in_w, out_w, in_ids, n_in, out_ids, n_out, coef)
    loss = _steps_from_scores(coef, n_in, n_out, lr, with_loss)
    _input_steps(out_w, out_ids, n_out, n_in, coef, in_delta)
    _output_steps(in_w, in_ids, n_in, out_w, out_ids, n_out, coef)
    _add_rows(in_w, in_ids, n_in, in_delta)
    return loss


@njit(inline="always")
def _step_state(base_seed, step):
    """The generator state of one step: splitmix64 of (base_seed, step), so that every step
    draws the same numbers however the steps are grouped into calls or threads."""
    z = np.uint64(base_seed) + (np.uint64(step) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(inline="always")
def _draw_center(state, kept_ids, pos, window, negative, accept, alias, out_ids):
    """The random draws of the center at pos: its window's reach (1..window each side) and
    out_ids[:n] <- the center, then its negatives by the alias table, a draw equal to the center
    skipped (as word2vec); returns (state, reach, n)."""
    state = _lcg(state)
    reach = 1 + _below(state, window)
    word = np.int64(kept_ids[pos])
    out_ids[0] = word
    n_out = 1
    for _ in range(negative):
        state, neg = _alias_draw(state, accept, alias)
        if neg != word:
            out_ids[n_out] = neg
            n_out += 1
    return state, reach, n_out


@njit(inline="always")
def _contexts(kept_ids, sent_lo, sent_hi, pos, reach, in_ids):
    """in_ids[:n] <- the words at most reach from pos inside its sentence, pos excluded; returns n."""
    n_in = 0
    for ctx_pos in range(max(sent_lo, pos - reach), min(sent_hi, pos + reach + 1)):
        if ctx_pos != pos:
            in_ids[n_in] = np.int64(kept_ids[ctx_pos])
            n_in += 1
    return n_in


@njit(inline="always")
def _mark_rows(in_marks, out_marks, in_ids, n_in, out_ids, n_out):
    """A byte per row a window writes: its context rows in in_marks, its center and negatives in out_marks."""
    for j in range(n_in):
        in_marks[in_ids[j]] = 1
    for o in range(n_out):
        out_marks[out_ids[o]] = 1


# A step sums the loss of one window in LOSS_SAMPLE (those at a random offset, then every
# LOSS_SAMPLE-th), times LOSS_SAMPLE: an unbiased estimate of its loss, without the logarithms of
# every pair.
LOSS_SAMPLE = 8
# A thread adds its hot rows' changes to the shared rows every MERGE_STEPS steps: the other threads
# see them that much later, and the merge's cost (every hot row, read and written) stays small
# beside the steps' work.
MERGE_STEPS = 16


@njit(inline="always")
def _to_replicas(ids, n, hot_slots, base):
    """ids[:n] <- the thread's replica row of each hot word (hot_slots[word] >= 0); other words keep their row."""
    for k in range(n):
        slot = hot_slots[ids[k]]
        if slot >= 0:
            ids[k] = base + slot


@njit(inline="always")
def _merge_replicas(table, hot_words, base, snapshot):
    """Add each replica row's change since its snapshot to its word's shared row, then restart
    the replica and its snapshot from the shared row (which holds the other threads' changes too)."""
    dim = table.shape[1]
    for slot in range(len(hot_words)):
        word, replica = hot_words[slot], base + slot
        for t in range(dim):
            value = table[word, t] + (table[replica, t] - snapshot[slot, t])
            table[word, t] = value
            table[replica, t] = value
            snapshot[slot, t] = value


@njit(inline="always")
def _start_replicas(table, hot_words, base, snapshot):
    dim = table.shape[1]
    for slot in range(len(hot_words)):
        word, replica = hot_words[slot], base + slot
        for t in range(dim):
            table[replica, t] = table[word, t]
            snapshot[slot, t] = table[word, t]


@njit(parallel=True, fastmath=True, nogil=True, cache=True, error_model="numpy")
def train_steps(in_w, out_w, kept_ids, sentence_bounds, step_bounds, first_step, base_seed, lr_bounds, window,
                negative, accept, alias, loss_out, pairs_out, in_marks, out_marks, mark, n_shares, hot_slots,
                hot_words, in_snapshots, out_snapshots):
    """Train the steps whose centers are kept_ids[step_bounds[s]:step_bounds[s + 1]], s = 0..n-1,
    a window_step per center, in n_shares runs of consecutive steps, one per thread.

    sentence_bounds: where every sentence of kept_ids starts, with len(kept_ids) appended; a
    window never crosses them, and may reach into a neighbouring step's tokens. Step s is the
    epoch's step first_step + s: its random draws (the loss sample's offset, then each center's
    _draw_center) come from _step_state(base_seed, first_step + s), and its learning rate falls
    linearly from lr_bounds[s] to lr_bounds[s + 1]. Per-step pair counts go to pairs_out, and
    loss sums to loss_out: estimates from one window in LOSS_SAMPLE, unbiased. With mark, every
    row a step writes gets a 1 in in_marks / out_marks (--async's sparse exchange sends those
    rows; threads racing on a byte all write the same value).

    hot_words (none with one share) are the words every thread writes all the time: share k
    trains its own copy of their rows, at rows n_words + k * len(hot_words) + slot of both
    tables (n_words: the rows of hot_slots), and adds its change to the shared rows every
    MERGE_STEPS steps and at its end. Threads writing the same rows would otherwise pass
    the rows' cache lines back and forth between their cores at every window.
    """
    n_steps, n_hot = len(step_bounds) - 1, len(hot_words)
    for share in prange(n_shares):
        base = len(hot_slots) + share * n_hot
        if n_hot:
            _start_replicas(in_w, hot_words, base, in_snapshots[share])
            _start_replicas(out_w, hot_words, base, out_snapshots[share])
        first, last = share * n_steps // n_shares, (share + 1) * n_steps // n_shares
        for s in range(first, last):
            loss_out[s], pairs_out[s] = _train_step(in_w, out_w, kept_ids, sentence_bounds, step_bounds[s],
                                                    step_bounds[s + 1], _step_state(base_seed, first_step + s),
                                                    lr_bounds[s], lr_bounds[s + 1], window, negative, accept, alias,
                                                    in_marks, out_marks, mark, hot_slots, base, n_hot)
            if n_hot and ((s - first) % MERGE_STEPS == MERGE_STEPS - 1 or s == last - 1):
                _merge_replicas(in_w, hot_words, base, in_snapshots[share])
                _merge_replicas(out_w, hot_words, base, out_snapshots[share])


# Bytes kept free on both sides of a thread's scratch arrays: the allocator may place two threads'
# arrays side by side, and the window step writes them all the time (the threads' cores would pass
# the cache lines they share back and forth).
GUARD_BYTES = 4096


@njit(inline="always")
def _own_ids(n):
    """np.empty(n, int64), with no other thread's data within GUARD_BYTES."""
    guard = GUARD_BYTES // 8
    return np.empty(n + 2 * guard, dtype=np.int64)[guard:guard + n]


@njit(inline="always")
def _own_rows(n, width):
    """np.empty((n, width), float32), with no other thread's data within GUARD_BYTES."""
    guard = GUARD_BYTES // (4 * width) + 1
    return np.empty((n + 2 * guard, width), dtype=np.float32)[guard:guard + n]


@njit(inline="always")
def _train_step(in_w, out_w, kept_ids, sentence_bounds, lo, hi, state, lr_lo, lr_hi, window, negative, accept, alias,
                in_marks, out_marks, mark, hot_slots, base, n_hot):
    """One step of train_steps: the centers kept_ids[lo:hi]; returns (loss estimate, pairs).

    Each center's draws are made while the previous center trains, and the rows they name are
    prefetched: the negatives' rows are scattered over the table, and waiting for them from
    memory would otherwise stall the window's first pass.
    """
    dim = in_w.shape[1]
    state = _lcg(state)
    sampled = np.int64((state >> np.uint64(16)) % np.uint64(LOSS_SAMPLE))
    in_ids, out_ids, next_ids = _own_ids(2 * window), _own_ids(negative + 1), _own_ids(negative + 1)
    coef, in_delta = _own_rows(negative + 1, 2 * window), _own_rows(2 * window, dim)
    loss = 0.0
    pairs = 0
    sentence = np.searchsorted(sentence_bounds, lo, side="right") - 1
    span = max(1, hi - lo)
    reach = n_out = 0
    if lo < hi:
        state, reach, n_out = _draw_center(state, kept_ids, lo, window, negative, accept, alias, out_ids)
    for pos in range(lo, hi):
        next_reach = next_n_out = 0
        if pos + 1 < hi:
            state, next_reach, next_n_out = _draw_center(state, kept_ids, pos + 1, window, negative, accept,
                                                         alias, next_ids)
            for k in range(next_n_out):
                slot = hot_slots[next_ids[k]] if n_hot else -1
                _prefetch_row(out_w, base + slot if slot >= 0 else next_ids[k])
            word = np.int64(kept_ids[min(pos + 1 + next_reach, len(kept_ids) - 1)])
            slot = hot_slots[word] if n_hot else -1
            _prefetch_row(in_w, base + slot if slot >= 0 else word)
        while pos >= sentence_bounds[sentence + 1]:
            sentence += 1
        n_in = _contexts(kept_ids, sentence_bounds[sentence], sentence_bounds[sentence + 1], pos, reach, in_ids)
        if n_in > 0:
            if mark:
                _mark_rows(in_marks, out_marks, in_ids, n_in, out_ids, n_out)
            if n_hot:
                _to_replicas(in_ids, n_in, hot_slots, base)
                _to_replicas(out_ids, n_out, hot_slots, base)
            lr = lr_lo + (lr_hi - lr_lo) * (pos - lo) / span
            with_loss = (pos - lo) % LOSS_SAMPLE == sampled
            loss += LOSS_SAMPLE * window_step(in_w, out_w, in_ids, n_in, out_ids, n_out, lr, coef, in_delta,
                                              with_loss)
            pairs += n_in
        for k in range(next_n_out):
            out_ids[k] = next_ids[k]
        reach, n_out = next_reach, next_n_out
    return loss, pairs


@njit(cache=True, nogil=True)
def keep_tokens(token_ids, keep_prob, draws, starts, kept, kept_starts):
    """Subsampling's pass over a block of tokens: token i stays where draws[i] < keep_prob[its
    word], into kept; kept_starts[k] <- the kept tokens before starts[k] (block positions,
    increasing). Returns the number kept. One pass, where numpy's gather, compare, compress and
    search would each walk the block."""
    n_kept = 0
    k = 0
    for i in range(len(token_ids)):
        while k < len(starts) and starts[k] <= i:
            kept_starts[k] = n_kept
            k += 1
        word = token_ids[i]
        if draws[i] < keep_prob[word]:
            kept[n_kept] = word
            n_kept += 1
    while k < len(starts):
        kept_starts[k] = n_kept
        k += 1
    return n_kept


_NO_MARKS = np.zeros(0, dtype=np.uint8)


def set_threads(num_threads):
    """Use num_threads kernel threads (at most what numba was started with). The first call
    starts numba's worker pool, which sets OpenMP's thread count for the process."""
    numba.set_num_threads(max(1, min(num_threads, numba.config.NUMBA_NUM_THREADS)))
    return numba.get_num_threads()


# Floats in a cache line: rows that start on one (engines._room_below) take whole-line vector loads.
ROW_ALIGN = 16
# The rows each thread of a multi-thread run trains its own copy of: the most frequent words, whose
# rows nearly every window writes (bench/RESULTS.md, the kernel's threads).
HOT_ROWS = 512


class HotRows:
    """The hot words of train_steps and each thread's snapshots of their rows (none with one
    thread). The tables it trains need extra_rows rows beyond the vocabulary's, for the copies."""

    def __init__(self, counts, dim, n_threads=None):
        n_threads = numba.get_num_threads() if n_threads is None else n_threads
        n_hot = min(HOT_ROWS, len(counts)) if n_threads > 1 else 0
        self.n_threads = n_threads
        self.words = np.argsort(-np.asarray(counts), kind="stable")[:n_hot].astype(np.int64)
        self.slots = np.full(len(counts), -1, dtype=np.int32)
        self.slots[self.words] = np.arange(n_hot, dtype=np.int32)
        self.in_snapshots = np.zeros((n_threads, n_hot, dim), dtype=np.float32)
        self.out_snapshots = np.zeros((n_threads, n_hot, dim), dtype=np.float32)
        self.extra_rows = n_threads * n_hot


_NO_HOT_ROWS = HotRows(np.zeros(0), 1, n_threads=1)


def train(in_w, out_w, kept_ids, sentence_bounds, step_bounds, first_step, base_seed, lr_bounds, window, negative,
          sampler, marks=None, hot=None):
    """train_steps on the numba threads set by set_threads; returns per-step (loss sums, pair counts).
    marks: (in_marks, out_marks), a byte per row of each table, where the call marks the rows it
    writes (None: it marks none). hot: a HotRows for tables with its extra rows, or None (every
    thread trains the shared rows).

    A step's loss is NaN or infinite where the weights diverged, as a sampled window's loss shows
    (the callers stop the run, naming epoch and step); the trainer's check of the weights at every
    epoch's end catches what the sample misses.
    """
    n_steps = len(step_bounds) - 1
    hot = hot if hot is not None else _NO_HOT_ROWS
    n_shares = max(1, min(n_steps, hot.n_threads if len(hot.words) else numba.get_num_threads()))
    loss_out, pairs_out = np.zeros(n_steps), np.zeros(n_steps, dtype=np.int64)
    in_marks, out_marks = marks if marks is not None else (_NO_MARKS, _NO_MARKS)
    train_steps(in_w, out_w, kept_ids, sentence_bounds, np.asarray(step_bounds, dtype=np.int64),
                np.int64(first_step), np.uint64(base_seed), np.asarray(lr_bounds, dtype=np.float64), window,
                negative, sampler.accept, sampler.alias, loss_out, pairs_out, in_marks, out_marks, marks is not None,
                n_shares, hot.slots, hot.words, hot.in_snapshots, hot.out_snapshots)
    return loss_out, pairs_out


def warm_up(in_w, out_w, sampler, window, negative):
    """Have numba load (or compile) train_steps and keep_tokens before the first epoch starts its
    clock, by calls that change nothing (one step of two tokens at learning rate 0, no hot rows; no
    tokens): the first call costs a noticeable part of a second even from numba's cache."""
    train(in_w, out_w, np.zeros(2, dtype=np.uint32), np.array([0, 2], dtype=np.int64), [0, 2], 0, 1, [0.0, 0.0],
          window, negative, sampler)
    no_starts = np.zeros(0, dtype=np.int64)
    keep_tokens(np.zeros(0, dtype=np.uint32), np.zeros(1, dtype=np.float32), np.zeros(0, dtype=np.float32),
                no_starts, np.zeros(0, dtype=np.uint32), no_starts)


# ---------------------------------------------------------------------------------------------
# --async's exchange (distributed.Averager): the row passes, the plan of the rows an exchange
# visits, and the layout of this rank's rows among the rows all ranks agreed to send. The wire
# arrays hold the bits of the wire's floats: uint16 for bfloat16, uint32 for float32.

PENDING, ALIVE = 1, 2  # an exchange's row state bits: rounding left part of the row unsent; its momentum is not 0
_STATE_BITS = np.uint64(0x0101010101010101)  # one bit of each of 8 state bytes read as one uint64


@njit(inline="always")
def _bf16_bits(bits):
    """The bfloat16 nearest (ties to even) a float32 given by its bits, as its 16 bits: torch's rounding."""
    return (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)


@njit(inline="always")
def _from_wire(value, bf16):
    """A wire value as the bits of its float32."""
    return np.uint32(value) << np.uint32(16) if bf16 else np.uint32(value)


@njit(inline="always")
def _to_wire(bits, bf16):
    """A float32 (its bits) rounded for the wire, as the wire value's bits."""
    return _bf16_bits(bits) if bf16 else bits


@njit(inline="always")
def _mean_change(row, ranks, t):
    """A summed change over the ranks that made it: x / ranks, as a multiplication where 1 / ranks is exact (the same bits)."""
    if ranks == 1:
        return row[t]
    whole = np.int64(ranks)
    if whole & (whole - 1) == 0:
        return row[t] * (np.float32(1.0) / ranks)
    return row[t] / ranks


@njit(inline="always")
def _apply_row(consensus, momentum, block_momentum, state, r, received, received_counts, q, bf16, bits, row):
    """Move the consensus row r by its received mean change (slot q; -1: none) through the block momentum."""
    width = consensus.shape[1]
    ranks = np.float32(1.0)
    if q >= 0:
        bits[0] = _from_wire(received_counts[q], bf16)
        ranks = max(row[0], np.float32(1.0))
        for t in range(width):
            bits[t] = _from_wire(received[q, t], bf16)
    else:
        for t in range(width):
            row[t] = np.float32(0.0)
    if block_momentum == 0:
        for t in range(width):
            consensus[r, t] += _mean_change(row, ranks, t)
        return
    moving = False
    for t in range(width):
        step = momentum[r, t] * block_momentum + _mean_change(row, ranks, t)
        momentum[r, t] = step
        moving |= step != 0
        consensus[r, t] += step
    state[r] = (state[r] | ALIVE) if moving else (state[r] & ~np.uint8(ALIVE))


@njit(inline="always")
def _rebase_row(values, sent_from, consensus, unsent, state, r, bits, row):
    """Rebase a row this rank did not change (values == sent_from): consensus plus what rounding left of it."""
    width = values.shape[1]
    if state[r] & PENDING:
        for t in range(width):
            bits[t] = np.uint32(unsent[r, t]) << np.uint32(16)
    else:
        for t in range(width):
            row[t] = np.float32(0.0)
    for t in range(width):
        values[r, t] = consensus[r, t] + (np.float32(0.0) + row[t])
        sent_from[r, t] = values[r, t]


@njit(inline="always")
def _send_row(values, sent_from, consensus, unsent, state, r, changes, change_counts, s, flush, bf16, bits, row):
    """Put into slot s this rank's change of row r, and rebase the row on the consensus."""
    width = values.shape[1]
    changed = False
    for t in range(width):
        progress = values[r, t] - sent_from[r, t]
        changed |= progress != 0
        bits[t] = np.uint32(unsent[r, t]) << np.uint32(16)
        row[t] = progress + row[t]  # all this rank learnt that the consensus has not heard of
        values[r, t] = consensus[r, t] + row[t]
        sent_from[r, t] = values[r, t]
    change_counts[s] = _to_wire(np.uint32(0x3F800000), bf16) if changed else 0  # 1.0 or 0.0
    if not (changed or flush):  # what rounding left of an unchanged row waits for its next change
        for t in range(width):
            changes[s, t] = 0
        return
    left = False
    for t in range(width):
        rounded = _to_wire(bits[t], bf16)
        changes[s, t] = rounded
        total = row[t]
        bits[t] = _from_wire(rounded, bf16)
        row[t] = total - row[t]  # what rounding left out: sent with the row's next change
        unsent[r, t] = np.uint16(_bf16_bits(bits[t]))
        left |= unsent[r, t] != 0
    state[r] = (state[r] | PENDING) if left else (state[r] & ~np.uint8(PENDING))


_ROWS_PER_TASK = 64  # rows a thread takes at a time; one scratch row each


@njit(parallel=True, nogil=True, cache=True)
def exchange_rows(values, sent_from, consensus, unsent, momentum, block_momentum, rows, received, received_counts,
                  recv_slots, changes, change_counts, send_slots, state, apply, send, flush):
    """distributed.exchange_rows (the reference, for GPUs) in one pass over the listed rows instead of
    a dozen over the tables, the rows shared among the kernel's threads; the same float32
    operations in the same order and the same rounding, so the same bits. A row without a send
    slot is one this rank did not change: only its consensus and what rounding left are read.
    unsent holds bfloat16 bits; received, received_counts, changes and change_counts the wire's
    bits. In place (the dense exchange) the received and the changes arrays may be the same: a
    row is read before it is written."""
    bf16 = changes.itemsize == 2
    for task in prange((len(rows) + _ROWS_PER_TASK - 1) // _ROWS_PER_TASK):
        bits = np.empty(values.shape[1], dtype=np.uint32)  # a float32 row and its bits: numba views arrays, not scalars
        row = bits.view(np.float32)
        for j in range(task * _ROWS_PER_TASK, min(len(rows), (task + 1) * _ROWS_PER_TASK)):
            r = rows[j]
            if apply and (recv_slots[j] >= 0 or (state[r] & ALIVE) != 0):
                _apply_row(consensus, momentum, block_momentum, state, r, received, received_counts, recv_slots[j],
                           bf16, bits, row)
            if not send:  # the epoch's end: every rank takes the consensus itself, the same bits everywhere
                for t in range(values.shape[1]):
                    values[r, t] = consensus[r, t]
            elif send_slots[j] < 0:
                _rebase_row(values, sent_from, consensus, unsent, state, r, bits, row)
            else:
                _send_row(values, sent_from, consensus, unsent, state, r, changes, change_counts, send_slots[j],
                          flush, bf16, bits, row)


@njit(nogil=True, cache=True)
def plan_rows(union, marks, state, flush, rows, recv_slots, send_slots, bits):
    """The rows a sparse exchange visits, in ascending order: those of the last agreed union (union:
    a bit per row; empty: none), those this rank marked (marks: a byte per row, cleared here; with
    flush, also those with a pending rounding leftover) and those whose momentum still moves. Fills
    rows, each row's slot among the union's rows (recv_slots) and among this rank's (send_slots),
    -1 where it has none, and this rank's rows as bits (bits). marks and state are padded to whole
    8-byte words. Returns (rows to visit, rows of this rank)."""
    marks8, state8 = marks.view(np.uint64), state.view(np.uint64)
    wanted = _STATE_BITS * np.uint64(ALIVE | (PENDING if flush else 0))
    n = n_recv = n_send = 0
    for b in range(len(bits)):
        got_byte = union[b] if len(union) else np.uint8(0)
        bits[b] = 0
        if got_byte == 0 and marks8[b] == 0 and state8[b] & wanted == 0:
            continue
        for k in range(8):
            r = 8 * b + k
            got = (got_byte >> k) & 1
            mine = marks[r] != 0 or (flush and state[r] & PENDING)
            if got or mine or state[r] & ALIVE:
                rows[n] = r
                recv_slots[n] = n_recv if got else -1
                send_slots[n] = n_send if mine else -1
                n += 1
            n_recv += got
            if mine:
                bits[b] |= np.uint8(1 << k)
                marks[r] = 0
                n_send += 1
    return n, n_send


@njit(nogil=True, cache=True)
def scatter_rows(union, mine, staged, staged_counts, changes, change_counts):
    """This rank's staged rows (mine: their table rows, ascending) at their places among the
    agreed union's rows (a bit per row), zeros at the others' rows."""
    j = p = 0
    for b in range(len(union)):
        if union[b] == 0:
            continue
        for k in range(8):
            if (union[b] >> k) & 1:
                if p < len(mine) and mine[p] == 8 * b + k:
                    for t in range(changes.shape[1]):
                        changes[j, t] = staged[p, t]
                    change_counts[j] = staged_counts[p]
                    p += 1
                else:
                    for t in range(changes.shape[1]):
                        changes[j, t] = 0
                    change_counts[j] = 0
                j += 1


@njit(parallel=True, nogil=True, cache=True)
def mark_changed_rows(values, sent_from, marks):
    """Mark the rows whose values differ from sent_from: for training loops that do not mark the rows they write."""
    for r in prange(values.shape[0]):
        for t in range(values.shape[1]):
            if values[r, t] != sent_from[r, t]:
                marks[r] = 1
                break


def warm_up_exchange():
    """Have numba load (or compile) the exchange's loops before the first epoch starts its clock (a
    noticeable part of a second from numba's cache), by calls on empty rows, with the argument
    types of the real calls."""
    table, no_rows = np.zeros((0, 1), dtype=np.float32), np.zeros(0, dtype=np.int64)
    bytes8, no_bits = np.zeros(8, dtype=np.uint8), np.zeros(1, dtype=np.uint8)
    for wire in (np.uint16, np.uint32):
        changes, counts = np.zeros((0, 1), dtype=wire), np.zeros(0, dtype=wire)
        exchange_rows(table, table, table, np.zeros((0, 1), dtype=np.uint16), table, np.float32(0.0), no_rows,
                      changes, counts, no_rows, changes, counts, no_rows, bytes8, True, True, True)
        scatter_rows(no_bits[:0], no_rows, changes, counts, changes, counts)
    plan_rows(no_bits[:0], bytes8, bytes8, True, no_rows, no_rows, no_rows, no_bits)
    mark_changed_rows(table, table, bytes8)


# ---------------------------------------------------------------------------------------------
# The torch engine's batched steps on the CPU (engines.CompiledStep, --sync steps included): each
# touched row's gradient summed once, then applied once (from one rank's rows or all ranks'),
# packed as model.Rows: row keys number in_embed rows 0..V-1 and out_embed rows V..2V-1, and
# travel as two float32 columns (tables.KEY_SPLIT), so one float32 message carries gradients and
# keys together.


@njit(inline="always")
def _packed_key(packed, s, dim):
    return np.int64(packed[s, dim]) * KEY_SPLIT + np.int64(packed[s, dim + 1])


@njit(nogil=True, cache=True)
def number_rows(in_rows, in_uses, out_rows, vocab, slot, keys):
    """Give each distinct row of a step a slot, in first-seen order: the in_embed rows of the
    entries with real pairs (in_uses > 0; padding entries have a zero gradient), then the out_embed
    rows. slot (2V, all -1 between calls) maps key -> slot, keys gets slot -> key. Returns the count."""
    n = 0
    for j in range(in_rows.shape[0]):
        key = in_rows[j]
        if in_uses[j] != 0 and slot[key] < 0:
            slot[key] = n
            keys[n] = key
            n += 1
    for j in range(out_rows.shape[0]):
        key = vocab + out_rows[j]
        if slot[key] < 0:
            slot[key] = n
            keys[n] = key
            n += 1
    return n


@njit(nogil=True, cache=True)
def pack_rows(in_rows, in_uses, in_grads, out_rows, out_grads, vocab, slot, keys, packed):
    """Sum the entries' gradients per row into packed[slot] = [gradient | key packed in 2 columns |
    uses] (uses: the row's real pairs in in_embed, its entries in out_embed), adding the entries in
    their order, as index_add_ does; then clear slot for the next call. packed has one row a slot."""
    dim = in_grads.shape[1]
    for s in range(packed.shape[0]):
        packed[s, :] = 0.0
        packed[s, dim] = keys[s] // KEY_SPLIT
        packed[s, dim + 1] = keys[s] % KEY_SPLIT
    for j in range(in_rows.shape[0]):
        if in_uses[j] != 0:
            s = slot[in_rows[j]]
            for t in range(dim):
                packed[s, t] += in_grads[j, t]
            packed[s, dim + 2] += in_uses[j]
    for j in range(out_rows.shape[0]):
        s = slot[vocab + out_rows[j]]
        for t in range(dim):
            packed[s, t] += out_grads[j, t]
        packed[s, dim + 2] += np.float32(1.0)
    for s in range(packed.shape[0]):
        slot[keys[s]] = -1


@njit(nogil=True, cache=True)
def apply_rows(in_w, out_w, packed, segments, vocab, lr, cap, tally):
    """SGD from the packed rows of segments (start, stop), in their order (every rank's rows in rank
    order): each row moves by -lr * min(1, cap / k) * its gradient, k its uses summed over all
    segments, as model.SGNS.window_step scales a row met more than cap times. tally: 2V zeros between
    calls. float32 throughout, so every rank computes the same bits."""
    dim = in_w.shape[1]
    for g in range(segments.shape[0]):
        for s in range(segments[g, 0], segments[g, 1]):
            tally[_packed_key(packed, s, dim)] += packed[s, dim + 2]
    for g in range(segments.shape[0]):
        for s in range(segments[g, 0], segments[g, 1]):
            key = _packed_key(packed, s, dim)
            factor = min(cap / tally[key], np.float32(1.0))
            table, row = (in_w, key) if key < vocab else (out_w, key - vocab)
            for t in range(dim):
                table[row, t] -= lr * (packed[s, t] * factor)
    for g in range(segments.shape[0]):
        for s in range(segments[g, 0], segments[g, 1]):
            tally[_packed_key(packed, s, dim)] = 0.0


class TouchedRows:
    """The rows a batched SGD step touches (engines.CompiledStep, --sync steps included), with
    what the compiled loops above reuse from step to step: the maps over the 2V row keys, slot
    (-1) and tally (0), which every step leaves as it found them, and the float32 arrays a step
    fills (scratch): its packed rows and the products of model.window_grads.

    A step calls number (its windows), then pack (their gradients) into rows of buffer(n), then
    apply (those rows, or every rank's).
    """

    def __init__(self, vocab, dim):
        self.vocab, self.dim = vocab, dim
        self.slot = np.full(2 * vocab, -1, dtype=np.int32)
        self.tally = np.zeros(2 * vocab, dtype=np.float32)
        self.keys = np.empty(0, dtype=np.int64)
        self.count = 0  # rows numbered and not packed yet
        self._scratch = {}

    def number(self, context_ids, weight, out_ids):
        """Number the distinct rows of windows (numpy arrays, as model.window_grads takes them); returns the count."""
        self.slot[self.keys[:self.count]] = -1  # a step that failed between number and pack
        self.in_rows = np.ascontiguousarray(context_ids.reshape(-1), dtype=np.int64)
        self.in_uses = np.ascontiguousarray(weight.reshape(-1), dtype=np.float32)
        self.out_rows = np.ascontiguousarray(out_ids.reshape(-1), dtype=np.int64)
        self.keys = np.empty(len(self.in_rows) + len(self.out_rows), dtype=np.int64)
        self.count = number_rows(self.in_rows, self.in_uses, self.out_rows, self.vocab, self.slot, self.keys)
        return self.count

    def buffer(self, n):
        """n packed rows, width dim + 3, on reused storage (scratch)."""
        return self.scratch("packed", (n, self.dim + 3))

    def scratch(self, name, shape):
        """A float32 array of shape on storage kept for the next call with the same name. Allocated
        afresh each step, the packed rows would pay their page faults again, and the products of
        model.window_grads above malloc's mmap threshold would be mapped and page-faulted anew
        every time, which costs as much as the step's arithmetic at large batches."""
        size = math.prod(shape)
        store = self._scratch.get(name)
        if store is None or len(store) < size:
            store = self._scratch[name] = np.empty(max(size, 0 if store is None else 3 * len(store) // 2),
                                                   dtype=np.float32)
        return store[:size].reshape(shape)

    def pack(self, in_grads, out_grads, packed):
        """The numbered rows' summed gradients into packed (count rows; pack_rows)."""
        pack_rows(self.in_rows, self.in_uses, in_grads, self.out_rows, out_grads, self.vocab, self.slot,
                  self.keys[:self.count], packed)
        self.count = 0

    def apply(self, in_w, out_w, packed, lr, cap, segments=None):
        """SGD from the packed rows of segments (apply_rows; default: all of packed)."""
        if segments is None:
            segments = np.array([[0, len(packed)]], dtype=np.int64)
        apply_rows(in_w, out_w, packed, segments, self.vocab, np.float32(lr), np.float32(cap), self.tally)


@functools.lru_cache(maxsize=1)
def touched_rows(vocab, dim):
    """The TouchedRows of a model's tables, made once."""
    return TouchedRows(vocab, dim)


def warm_up_rows():
    """Have numba load (or compile) TouchedRows' loops before the first epoch starts its clock,
    by calls on empty rows, with the argument types of the real calls."""
    no_ids, no_uses, no_rows = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32), np.zeros((0, 4), np.float32)
    slot = np.full(2, -1, dtype=np.int32)
    number_rows(no_ids, no_uses, no_ids, 1, slot, no_ids)
    no_grads = np.zeros((0, 1), np.float32)
    pack_rows(no_ids, no_uses, no_grads, no_ids, no_grads, 1, slot, no_ids, no_rows)
    apply_rows(np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32), no_rows, np.zeros((0, 2), np.int64), 1,
               np.float32(0.0), np.float32(1.0), np.zeros(2, np.float32))


@njit(nogil=True, cache=True)
def add_gram_changes(gram_w, gram_ids, gram_counts, change, share, power):
    """The rnn model's n-gram rows learn a step's changes of its words' input vectors (change, one
    row a word): each row gram_ids lists for a word (gram_counts[i] of them for word i) moves by
    share times the sum of the changes of the words that have it, over their number to the power
    power. One pass in the words' order, so the sums come out the same every run."""
    sharers = np.zeros(gram_w.shape[0], dtype=np.int32)
    for row in gram_ids:
        sharers[row] += 1
    entry = 0
    for word in range(len(gram_counts)):
        for _ in range(gram_counts[word]):
            row = gram_ids[entry]
            coef = share / sharers[row] ** power
            for j in range(gram_w.shape[1]):
                gram_w[row, j] += coef * change[word, j]
            entry += 1
