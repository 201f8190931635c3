"""engines.py: which loop trains a run, the CPU's compiled window step, and the loops' shared step rules."""
import argparse

import numpy as np
import pytest
import torch

import cpu_kernel
import engines
import tables
from model import SGNS


def small_model(seed, vocab=12, dim=6):
    gen = torch.Generator().manual_seed(seed)
    model = SGNS(vocab, dim)
    with torch.no_grad():  # context vectors start at zero; give them values so gradients are non-trivial
        model.out_embed.weight.copy_(torch.randn(vocab, dim, generator=gen) * 0.5)
        model.in_embed.weight.copy_(torch.randn(vocab, dim, generator=gen) * 0.5)
    return model


@pytest.mark.parametrize("key,engine,loop", [
    (("sgns", "sgd", "cpu", "one"), "auto", "kernel"),
    (("sgns", "sgd", "cpu", "one"), "torch", "window"),
    (("sgns", "sgd", "cpu", "async"), "auto", "kernel"),
    (("sgns", "sgd", "cpu", "sync"), "auto", "window"),
    (("sgns", "sgd", "cuda", "one"), "auto", "window"),
    (("sgns", "sgd", "cuda", "multi-gpu"), "auto", "autograd"),
    (("sgns", "sparse_adam", "cpu", "one"), "auto", "autograd"),
    (("sgns", "adam", "cuda", "sync"), "torch", "autograd"),
    (("rnn", "adam", "cpu", "one"), "auto", "spelling"),
    (("rnn", "adam", "cpu", "one"), "kernel", "spelling"),
    (("rnn", "adam", "cpu", "one"), "torch", "autograd"),
    (("rnn", "adam", "cuda", "one"), "auto", "autograd"),
    (("rnn", "sgd", "cpu", "async"), "auto", "autograd"),
])
def test_the_engine_table_picks_one_loop_per_run(key, engine, loop):
    assert engines.choose_loop(*key, engine) == (loop, None)


@pytest.mark.parametrize("key", [("sgns", "sgd", "cpu", "sync"), ("sgns", "sgd", "cuda", "one"),
                                 ("sgns", "sparse_adam", "cpu", "one"), ("rnn", "sgd", "cpu", "sync")])
def test_engine_kernel_where_it_cannot_run_says_why(key):
    loop, why_not = engines.choose_loop(*key, "kernel")
    assert loop is None and "--engine kernel" in why_not


def test_steps_share_out_the_epoch_and_words_add_up_to_the_corpus():
    assert engines.centers_per_step(4096, 5) == 682 and engines.centers_per_step(4096, 5, world_size=2) == 341
    n_steps = engines.epoch_steps(10_001, 341, 2)
    assert n_steps == 15  # the larger share, 5,001 centers, over 341 a step
    epoch = engines.Epoch(0, 0, 341, n_steps, None, None)
    assert sum(epoch.words(999, i + 1) - epoch.words(999, i) for i in range(n_steps)) == 999
    assert engines.lr_at(argparse.Namespace(lr=0.1), 0.5) == pytest.approx(0.05)
    assert engines.lr_at(argparse.Namespace(lr=0.1), 1.0) == pytest.approx(1e-5)


def test_compiled_window_step_equals_the_tensor_step_even_after_an_unfinished_one():
    """On the CPU the window loop sums rows with compiled loops (cpu_kernel.TouchedRows); a lr given
    as a tensor takes the tensor ops. Both agree with model.window_step, also when a step stopped
    between numbering its rows and packing them (the next one clears what it left)."""
    compiled, tensors = small_model(seed=7), small_model(seed=7)
    gen = torch.Generator().manual_seed(7)
    rows = cpu_kernel.touched_rows(compiled.vocab_size, compiled.embed_size)
    step = engines.choose_window_step(compiled, torch.device("cpu"))
    for i in range(5):
        out_ids, context_ids = torch.randint(0, 12, (6, 3), generator=gen), torch.randint(0, 12, (6, 4), generator=gen)
        weight = (torch.rand(6, 4, generator=gen) < 0.7).float()
        if i == 2:  # numbered, never packed
            rows.number(torch.randint(0, 12, (6, 4)).numpy(), torch.ones(6, 4).numpy(), out_ids.numpy())
        stats = step(context_ids, weight, out_ids, 0.1)
        expected = tensors.window_step(context_ids, weight, out_ids, torch.tensor(0.1))
        torch.testing.assert_close(stats, expected)
    for key, value in tensors.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, atol=1e-6, rtol=1e-6)
        assert not torch.equal(value, small_model(seed=7).state_dict()[key])
    assert (rows.slot == -1).all() and (rows.tally == 0).all()  # left clean for the next step


def test_the_tensor_step_in_two_phases_equals_the_tensor_step(monkeypatch):
    """TensorStep's grads (a row per slot) then apply, as a --sync run without Triton calls them, give
    model.window_step's update (the row cap biting, at 2) and its [loss sum, pairs]."""
    monkeypatch.setattr(engines.models, "MAX_SUMMED_GRADIENTS", 2)
    two_phases, reference = small_model(seed=3), small_model(seed=3)
    gen = torch.Generator().manual_seed(3)
    step = engines.TensorStep(two_phases)
    for _ in range(3):
        out_ids, context_ids = torch.randint(0, 12, (6, 3), generator=gen), torch.randint(0, 12, (6, 4), generator=gen)
        weight = (torch.rand(6, 4, generator=gen) < 0.7).float()
        rows = step.grads(context_ids, weight, out_ids)
        step.apply(rows, 0.1)
        torch.testing.assert_close(rows.stats, reference.window_step(context_ids, weight, out_ids, 0.1))
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(two_phases.state_dict()[key], value, atol=1e-6, rtol=1e-6)
        assert not torch.equal(value, small_model(seed=3).state_dict()[key])


@pytest.mark.parametrize("kind", ["numpy tables", "torch model"])
def test_the_kernels_tables_have_room_below_and_rows_on_cache_lines(kind):
    """engines._kernel_tables: each weight keeps its values as a view of a table with extra rows
    below, and every row of the table starts on a 64-byte line (cpu_kernel.ROW_ALIGN floats),
    for tables.Tables and for model.SGNS (--multi-node --async)."""
    model = tables.Tables(12, 20, seed=7) if kind == "numpy tables" else small_model(7, vocab=12, dim=20)

    def weights():
        return [np.asarray(w.detach() if isinstance(w, torch.Tensor) else w) for w in model.parameters()]
    before = [w.copy() for w in weights()]
    kernel_tables = engines._kernel_tables(model, 5)
    for table, weight, old in zip(kernel_tables, weights(), before):
        assert table.shape == (17, 20) and table.strides[0] % (4 * cpu_kernel.ROW_ALIGN) == 0
        assert table.ctypes.data % 64 == 0
        assert np.array_equal(weight, old) and np.array_equal(table[:12], old)
        table[3, 4] = 9.0  # the weight is the table's first rows, not a copy
        assert weight[3, 4] == 9.0
    vectors = np.asarray(model.embeddings())
    assert vectors.flags.c_contiguous and vectors[3, 4] == 9.0
