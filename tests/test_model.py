import numpy as np
import torch

import cpu_kernel
import data
from model import SGNS, build_model
from reference import reference_loss, reference_window_gradient


def small_case(seed=0, vocab=12, dim=6, batch=5, neg=3):
    gen = torch.Generator().manual_seed(seed)
    model = SGNS(vocab, dim)
    with torch.no_grad():  # context vectors start at zero; give them values so gradients are non-trivial
        model.out_embed.weight.copy_(torch.randn(vocab, dim, generator=gen) * 0.5)
        model.in_embed.weight.copy_(torch.randn(vocab, dim, generator=gen) * 0.5)
    center_ids = torch.randint(0, vocab, (batch,), generator=gen)
    context_ids = torch.randint(0, vocab, (batch,), generator=gen)
    neg_ids = torch.randint(0, vocab, (batch, neg), generator=gen)
    return model, center_ids, context_ids, neg_ids


def test_initialisation_as_word2vec():
    model = SGNS(1000, 50)
    assert model.out_embed.weight.abs().max() == 0
    w = model.in_embed.weight
    assert w.abs().max() <= 0.5 / 50 and w.std() > 0.5 / 50 / 3
    assert model.embeddings().shape == (1000, 50)


def test_loss_equals_hand_written_reference():
    model, center_ids, context_ids, neg_ids = small_case()
    loss = model(center_ids, context_ids, neg_ids)
    expected = reference_loss(model.in_embed.weight.double().detach(), model.out_embed.weight.double().detach(),
                              center_ids, context_ids, neg_ids)
    assert abs(loss.item() - expected) < 1e-5 * abs(expected)


def dense_grads(model):
    return model.in_embed.weight.grad.to_dense(), model.out_embed.weight.grad.to_dense()


def test_kernel_window_step_equals_the_reference_window_gradient():
    """The kernel's rule (HogBatch): one window's update is -lr times the gradient of the window's
    summed loss at the rows before the window. A context word repeated, a negative drawn twice and
    a negative equal to a context word are all plain terms of that sum."""
    model, _, _, _ = small_case(seed=3)
    in_ids = np.array([7, 2, 7, 5, 1], dtype=np.int64)   # context words; 7 twice
    out_ids = np.array([4, 1, 9, 9], dtype=np.int64)     # the center, then negatives: 9 twice, 1 also a context
    in_w = model.in_embed.weight.detach().numpy().copy()
    out_w = model.out_embed.weight.detach().numpy().copy()
    loss, grad_in, grad_out = reference_window_gradient(in_w, out_w, in_ids, out_ids)
    coef = np.empty((len(out_ids), len(in_ids)), dtype=np.float32)
    in_delta = np.empty((len(in_ids), in_w.shape[1]), dtype=np.float32)
    kernel_loss = cpu_kernel.window_step(in_w, out_w, in_ids, len(in_ids), out_ids, len(out_ids), 0.05, coef,
                                         in_delta, True)
    assert abs(kernel_loss - loss) < 1e-5 * loss
    start_in, start_out = (t.detach().double().numpy() for t in (model.in_embed.weight, model.out_embed.weight))
    np.testing.assert_allclose(in_w, start_in - 0.05 * grad_in, atol=1e-6)
    np.testing.assert_allclose(out_w, start_out - 0.05 * grad_out, atol=1e-6)
    assert cpu_kernel.window_step(in_w, out_w, in_ids, 3, out_ids, 2, 0.05, coef, in_delta, False) == 0


def run_kernel(kept, starts, model, seed=7, threads=1, steps=2, calls=1, hot=None):
    """Train kept (sentences from starts) in `steps` steps, grouped into `calls` kernel calls, lr 0.05 -> 0.01.
    hot: a cpu_kernel.HotRows, whose copies train in rows added below the model's for the run."""
    cpu_kernel.set_threads(threads)
    bounds = np.append(starts, len(kept)).astype(np.int64)
    step_bounds = np.linspace(0, len(kept), steps + 1).astype(np.int64)
    lrs = np.linspace(0.05, 0.01, steps + 1)
    sampler = data.NegativeSampler(np.bincount(kept, minlength=model.vocab_size) + 1)
    extra = hot.extra_rows if hot is not None else 0
    tables = [np.concatenate([w.data.numpy(), np.full((extra, model.embed_size), np.nan, np.float32)])
              for w in (model.in_embed.weight, model.out_embed.weight)]
    losses, pairs = [], []
    for first, end in zip(*[np.linspace(0, steps, calls + 1).astype(int)[i:] for i in (0, 1)]):
        loss, n = cpu_kernel.train(*tables, kept, bounds, step_bounds[first:end + 1], first, seed,
                                   lrs[first:end + 1], 3, 4, sampler, hot=hot)
        losses.append(loss)
        pairs.append(n)
    with torch.no_grad():
        for weight, table in zip((model.in_embed.weight, model.out_embed.weight), tables):
            weight.copy_(torch.from_numpy(table[:model.vocab_size]))
    losses, pairs = np.concatenate(losses), np.concatenate(pairs)
    return losses.sum() / pairs.sum(), pairs.sum()


def structured_corpus(n_sentences=400):
    """Sentences drawn from two disjoint topics: words co-occur only within their topic."""
    rng = np.random.default_rng(0)
    topics = rng.integers(0, 2, n_sentences)
    sentences = [rng.integers(0, 20, 8) + 20 * t for t in topics]
    return np.concatenate(sentences).astype(np.uint32), np.arange(0, 8 * n_sentences, 8)


def test_kernel_is_reproducible_with_one_thread_and_learns():
    kept, starts = structured_corpus()
    torch.manual_seed(0)
    first, second = SGNS(40, 10), SGNS(40, 10)
    second.load_state_dict(first.state_dict())
    losses = [run_kernel(kept, starts, first, seed=s)[0] for s in range(1, 6)]
    for s in range(1, 6):
        run_kernel(kept, starts, second, seed=s)
    assert torch.equal(first.in_embed.weight, second.in_embed.weight)
    assert losses[-1] < losses[0] - 0.3
    # topic structure learned: same-topic words are closer than cross-topic words
    vecs = torch.nn.functional.normalize(first.embeddings(), dim=1)
    sims = vecs @ vecs.T
    same = sims[:20, :20].mean() + sims[20:, 20:].mean()
    cross = 2 * sims[:20, 20:].mean()
    assert same > cross + 0.2


def test_kernel_steps_train_the_same_however_they_are_grouped_into_calls():
    """A step draws from its own generator: one call of 12 steps, or 5 calls, give the same bits
    (what an exact resume mid-epoch and --async's calls that end at sync points rely on)."""
    kept, starts = structured_corpus()
    torch.manual_seed(0)
    one_call, five_calls = SGNS(40, 10), SGNS(40, 10)
    five_calls.load_state_dict(one_call.state_dict())
    assert run_kernel(kept, starts, one_call, steps=12, calls=1) == run_kernel(kept, starts, five_calls, steps=12,
                                                                               calls=5)
    assert torch.equal(one_call.in_embed.weight, five_calls.in_embed.weight)
    assert torch.equal(one_call.out_embed.weight, five_calls.out_embed.weight)


def test_threads_copies_of_the_hot_rows_train_as_the_shared_rows(monkeypatch):
    """Each share of the steps trains its own copy of the hot words' rows and adds the change to the
    shared rows as it goes. Run by one thread, the shares come one after the other, so the result
    is the shared rows' own training, up to the rounding of adding a change back."""
    monkeypatch.setattr(cpu_kernel, "HOT_ROWS", 6)
    monkeypatch.setattr(cpu_kernel, "MERGE_STEPS", 2)
    kept, starts = structured_corpus()
    hot = cpu_kernel.HotRows(np.bincount(kept, minlength=40), 10, n_threads=3)
    assert hot.extra_rows == 18 and sorted(hot.slots[hot.words]) == list(range(6))
    torch.manual_seed(0)
    shared, copies = SGNS(40, 10), SGNS(40, 10)
    copies.load_state_dict(shared.state_dict())
    (shared_loss, shared_pairs), (copies_loss, copies_pairs) = (run_kernel(kept, starts, m, steps=12, hot=h)
                                                                for m, h in ((shared, None), (copies, hot)))
    assert copies_pairs == shared_pairs and abs(copies_loss - shared_loss) < 1e-6
    for a, b in ((shared.in_embed.weight, copies.in_embed.weight), (shared.out_embed.weight, copies.out_embed.weight)):
        assert not torch.equal(a, SGNS(40, 10).in_embed.weight)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_kernel_with_hot_row_copies_learns_on_two_threads(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "HOT_ROWS", 8)
    kept, starts = structured_corpus()
    torch.manual_seed(0)
    model = SGNS(40, 10)
    hot = cpu_kernel.HotRows(np.bincount(kept, minlength=40), 10, n_threads=2)
    losses = [run_kernel(kept, starts, model, seed=s, threads=2, steps=8, hot=hot)[0] for s in range(1, 6)]
    assert losses[-1] < losses[0] - 0.3
    vecs = torch.nn.functional.normalize(model.embeddings(), dim=1)
    sims = vecs @ vecs.T
    assert sims[:20, :20].mean() + sims[20:, 20:].mean() > 2 * sims[:20, 20:].mean() + 0.2


def test_kernel_counts_pairs_like_the_numpy_window():
    kept, starts = structured_corpus(50)
    _, pairs = run_kernel(kept, starts, SGNS(40, 5))
    # the dynamic window gives W+1 pairs per center on average, fewer at sentence ends
    assert 0.6 * 4 * len(kept) < pairs < 4 * len(kept)


def test_build_model_by_name():
    assert isinstance(build_model("sgns", 10, 4), SGNS)


def test_window_grads_equal_autograd_on_the_expanded_pairs():
    """A window step is the pair loss over its real pairs, each context word's in-vector against the
    center's out-vector and the center's shared negatives; padded slots contribute nothing."""
    model, _, _, _ = small_case(seed=4)
    gen = torch.Generator().manual_seed(4)
    out_ids = torch.randint(0, 12, (4, 4), generator=gen)  # each window's center, then 3 negatives
    out_ids[0, 1] = out_ids[0, 0]  # repeated rows must add up
    context_ids = torch.randint(0, 12, (4, 6), generator=gen)
    weight = (torch.rand(4, 6, generator=gen) < 0.6).float()
    loss_sum, in_rows, in_grads, out_rows, out_grads = model.window_grads(context_ids, weight, out_ids)

    rows, cols = weight.nonzero(as_tuple=True)  # the real pairs, written out one by one
    pair_in, pair_out, pair_neg = context_ids[rows, cols], out_ids[rows, 0], out_ids[rows, 1:]
    expected = reference_loss(model.in_embed.weight.double().detach(), model.out_embed.weight.double().detach(),
                              pair_in, pair_out, pair_neg) * len(rows)
    assert abs(loss_sum.item() - expected) < 1e-5 * abs(expected)
    (model(pair_in, pair_out, pair_neg) * len(rows)).backward()
    auto_in, auto_out = dense_grads(model)
    assert torch.allclose(torch.zeros_like(auto_in).index_add_(0, in_rows, in_grads), auto_in, atol=1e-6)
    assert torch.allclose(torch.zeros_like(auto_out).index_add_(0, out_rows, out_grads), auto_out, atol=1e-6)


def test_window_grads_on_lent_scratch_arrays_give_the_same_bits_on_the_same_storage_each_step():
    """On the CPU the gradients are written to arrays kept from step to step (TouchedRows.scratch):
    the same values as fresh tensors, and no new storage for a step of the same size or smaller."""
    model, _, _, _ = small_case(seed=6)
    scratch = cpu_kernel.TouchedRows(12, model.embed_size).scratch
    gen = torch.Generator().manual_seed(6)
    storage = None
    for n_windows in (5, 5, 3):
        out_ids = torch.randint(0, 12, (n_windows, 4), generator=gen)
        context_ids = torch.randint(0, 12, (n_windows, 6), generator=gen)
        weight = (torch.rand(n_windows, 6, generator=gen) < 0.6).float()
        fresh = model.window_grads(context_ids, weight, out_ids)
        lent = model.window_grads(context_ids, weight, out_ids, scratch)
        for a, b in zip(fresh, lent):
            assert torch.equal(a, b)
        pointers = (lent[2].data_ptr(), lent[4].data_ptr())
        assert storage is None or pointers == storage
        storage = pointers


def test_window_step_is_sgd_with_the_lr_as_number_or_tensor():
    model, _, _, _ = small_case(seed=5)
    gen = torch.Generator().manual_seed(5)
    out_ids, context_ids = torch.randint(0, 12, (3, 3), generator=gen), torch.randint(0, 12, (3, 4), generator=gen)
    weight = (torch.rand(3, 4, generator=gen) < 0.7).float()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    _, in_rows, in_grads, out_rows, out_grads = model.window_grads(context_ids, weight, out_ids)
    results = []
    for lr in (0.1, torch.tensor(0.1)):
        model.load_state_dict(start)
        stats = model.window_step(context_ids, weight, out_ids, lr)
        assert stats[1] == weight.sum()
        results.append({k: v.clone() for k, v in model.state_dict().items()})
    expected_in = start["in_embed.weight"].index_add(0, in_rows, in_grads, alpha=-0.1)
    expected_out = start["out_embed.weight"].index_add(0, out_rows, out_grads, alpha=-0.1)
    for result in results:
        assert torch.allclose(result["in_embed.weight"], expected_in, atol=1e-7)
        assert torch.allclose(result["out_embed.weight"], expected_out, atol=1e-7)


def test_window_step_caps_the_summed_gradient_of_rows_met_too_often(monkeypatch):
    """A row met k > MAX_SUMMED_GRADIENTS times moves by its mean gradient times the cap; others by their sum."""
    import model as model_module
    monkeypatch.setattr(model_module, "MAX_SUMMED_GRADIENTS", 2)
    model, _, _, _ = small_case(seed=6)
    out_ids = torch.tensor([[0, 5, 6], [1, 5, 7], [2, 5, 8], [3, 5, 9]])  # out row 5 met 4 times, others once
    context_ids = torch.tensor([[4, 10], [4, 11], [4, 11], [10, 4]])
    weight = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])  # in row 4: 4 real pairs, 11: 1, 10: 1
    start = {k: v.clone() for k, v in model.state_dict().items()}
    _, in_rows, in_grads, out_rows, out_grads = model.window_grads(context_ids, weight, out_ids)
    summed_in = torch.zeros_like(start["in_embed.weight"]).index_add_(0, in_rows, in_grads)
    summed_out = torch.zeros_like(start["out_embed.weight"]).index_add_(0, out_rows, out_grads)
    model.window_step(context_ids, weight, out_ids, 0.1)
    in_scale = torch.ones(12, 1)
    in_scale[4] = 2 / 4
    out_scale = torch.ones(12, 1)
    out_scale[5] = 2 / 4
    assert torch.allclose(model.in_embed.weight, start["in_embed.weight"] - 0.1 * in_scale * summed_in, atol=1e-6)
    assert torch.allclose(model.out_embed.weight, start["out_embed.weight"] - 0.1 * out_scale * summed_out, atol=1e-6)


def test_the_kernels_draws_below_n_are_uniform():
    """cpu_kernel._below (a word's reach, the alias table's slot): every value below n as often."""
    from numba import njit
    from scipy import stats

    @njit
    def draws(n, count):
        state, out = np.uint64(12345), np.empty(count, dtype=np.int64)
        for i in range(count):
            state = cpu_kernel._lcg(state)
            out[i] = cpu_kernel._below(state, n)
        return out
    for n in (5, 21_000):
        values = draws(n, 400_000)
        assert values.min() == 0 and values.max() == n - 1
        assert stats.chisquare(np.bincount(values, minlength=n)).pvalue > 1e-3
