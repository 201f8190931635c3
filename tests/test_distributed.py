"""Several processes (Gloo on 127.0.0.1, CPU) and the DataParallel code path (on CPU it runs unreplicated)."""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cpu_kernel
import data
import distributed
import engines
import model as model_module
import trainer
from model import SGNS, RNNSGNS
from test_trainer import base_args, write_small_corpus

ROOT = Path(__file__).resolve().parent.parent
VOCAB, DIM, NEG = 40, 8, 3


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env():
    """No torchrun variables from the outside, our modules importable, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", NLTK_DATA=str(ROOT.parent / "shared" / "nltk_data"))
    return env


def run_ranks(worker, *args, world_size=2):
    """Run worker(rank, world_size, *args) in world_size spawned processes joined by a Gloo group."""
    init = f"tcp://127.0.0.1:{free_port()}"
    mp.start_processes(_join_and_run, args=(world_size, init, worker, args), nprocs=world_size,
                       start_method="spawn")


def _join_and_run(rank, world_size, init, worker, args):
    torch.set_num_threads(1)
    distributed.join_group("gloo", init, rank, world_size, timeout=30)
    finished = None
    try:
        worker(rank, world_size, *args)
        finished = distributed.leave_together()
    finally:
        dist.destroy_process_group()
        del finished


def hand_made_batches(n_steps, batch, seed=0):
    """(center_ids, context_ids, neg_ids) batches of pairs."""
    rng = np.random.default_rng(seed)
    for _ in range(n_steps):
        yield (torch.from_numpy(rng.integers(0, VOCAB, batch)), torch.from_numpy(rng.integers(0, VOCAB, batch)),
               torch.from_numpy(rng.integers(0, VOCAB, (batch, NEG))))


def hand_made_windows(n_steps, batch, seed=0):
    """(context_ids, weight, out_ids) windows as data.WindowBatches makes them, 4 slots a window."""
    rng = np.random.default_rng(seed)
    for _ in range(n_steps):
        yield (torch.from_numpy(rng.integers(0, VOCAB, (batch, 4))),
               torch.from_numpy((rng.random((batch, 4)) < 0.7).astype(np.float32)),
               torch.from_numpy(rng.integers(0, VOCAB, (batch, NEG + 1))))


def start_model(sparse=True):
    torch.manual_seed(3)
    model = SGNS(VOCAB, DIM, sparse=sparse)
    with torch.no_grad():  # contexts start at zero in SGNS; random ones make every gradient term count
        model.out_embed.weight.normal_(0, 0.3)
    return model


# Rank r takes rows r::world_size of each global batch; the last step leaves rank 1 with no pairs.
def split(tensor, rank, world_size, last):
    return tensor[:0] if last and rank == 1 else tensor[rank::world_size]


SMALL_CAP = 3  # MAX_SUMMED_GRADIENTS for the sync test: with 40 words, many rows pass it


def gloo_world(rank, world_size):
    return distributed.World(rank, world_size, rank, "gloo", "tcp://", 30, "cpu")


def _sync_worker(rank, world_size, out_dir):
    model_module.MAX_SUMMED_GRADIENTS = SMALL_CAP
    batches, windows = list(hand_made_batches(4, 30)), list(hand_made_windows(4, 30))
    sgd, sgd_tensors, adam_model = start_model(), start_model(), start_model()
    adam = torch.optim.SparseAdam(list(adam_model.parameters()), lr=0.01)
    strategy = distributed.SyncRanks(gloo_world(rank, world_size))
    assert strategy.wrap(adam_model) is adam_model  # sparse gradients: the row exchange, not DDP
    compiled, tensor_ops = engines.CompiledStep(sgd), engines.TensorStep(sgd_tensors)
    stats, tensor_stats = [], []
    for i, (batch, window) in enumerate(zip(batches, windows)):
        last = i == len(batches) - 1
        local_window = [split(t, rank, world_size, last) for t in window]
        rows, _ = strategy.gather_rows(compiled, local_window, len(window[0]), 0)  # the CPU's compiled step
        compiled.apply(rows, 0.1)
        stats.append(rows.stats)
        rows, _ = distributed._exchange_rows_all_gather(tensor_ops, local_window, len(window[0]), 0)  # the GPUs'
        tensor_ops.apply(rows, 0.1)
        tensor_stats.append([float(rows.stats[0]), float(rows.stats[1])])
        local = [split(t, rank, world_size, last) for t in batch]
        engines._autograd_step(autograd_engine(adam_model, adam, strategy), local, 0.01, 0)
    torch.save({"sgd": sgd.state_dict(), "sgd_tensors": sgd_tensors.state_dict(), "adam": adam_model.state_dict(),
                "stats": torch.tensor(stats, dtype=torch.float64),
                "tensor_stats": torch.tensor(tensor_stats, dtype=torch.float64)}, out_dir / f"rank{rank}.pt")


def _sync_triton_worker(rank, world_size, out_dir):
    model_module.MAX_SUMMED_GRADIENTS = SMALL_CAP
    model = start_model()
    step = engines.TritonStep(model)
    for i, window in enumerate(hand_made_windows(2, 12)):
        local_window = [split(t, rank, world_size, last=i == 1) for t in window]
        rows, stop = distributed._exchange_rows_all_gather(step, local_window, len(window[0]), 2 * rank)
        step.apply(rows, 0.1)
        assert stop == 2 * (world_size - 1)  # the largest signal of all ranks
    torch.save({"model": model.state_dict(), "stats": rows.stats}, out_dir / f"rank{rank}.pt")


def test_a_sync_run_on_gpus_steps_with_the_triton_kernels(tmp_path, monkeypatch):
    """The window step is chosen once per device: a GPU where Triton runs takes the Triton step,
    whatever the distribution, and --sync only exchanges its rows between its grads and its apply
    (GPUs' exchange, Triton's interpreter here): all ranks end equal to one process on the global batch."""
    pytest.importorskip("triton")
    monkeypatch.setattr(engines, "_triton_usable", lambda device: True)
    if not torch.cuda.is_available():  # Triton's interpreter, in the ranks from their start
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert type(engines.choose_window_step(start_model(), torch.device("cuda"))) is engines.TritonStep
    # no strategy replaces the step: window_epoch hands the engine's step to strategy.gather_rows
    assert not any(hasattr(s, "window_step") for s in (distributed.OneProcess, distributed.SyncRanks,
                                                       distributed.AsyncRanks))
    run_ranks(_sync_triton_worker, tmp_path)
    monkeypatch.setattr(model_module, "MAX_SUMMED_GRADIENTS", SMALL_CAP)
    reference = start_model()
    for i, window in enumerate(hand_made_windows(2, 12)):
        if i == 1:  # all but rank 1's rows, as in the ranks' last step
            window = [t[0::2] for t in window]
        expected_stats = reference.window_step(*window, lr=0.1)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key, expected in reference.state_dict().items():
        assert torch.equal(ranks[0]["model"][key], ranks[1]["model"][key])
        torch.testing.assert_close(ranks[0]["model"][key], expected, atol=1e-5, rtol=1e-5)
        assert not torch.equal(expected, start_model().state_dict()[key])
    torch.testing.assert_close(ranks[0]["stats"], expected_stats, rtol=1e-5, atol=1e-4)


def autograd_engine(model, optimizer, strategy, train_model=None):
    """What engines._autograd_step reads of an engine."""
    return argparse.Namespace(model=model, train_model=train_model or model, optimizer=optimizer, strategy=strategy,
                              args=argparse.Namespace(multi_gpu=False, model_name="sgns"))


@pytest.mark.parametrize("world_size", [2, 3])
def test_sync_steps_equal_single_process_steps_on_the_global_batch(tmp_path, monkeypatch, world_size):
    """Sync SGD (row sums capped by the global counts; compiled and tensor versions) and sync
    SparseAdam all equal one process, and the sync step reports the global batch's loss and pairs."""
    run_ranks(_sync_worker, tmp_path, world_size=world_size)
    monkeypatch.setattr(model_module, "MAX_SUMMED_GRADIENTS", SMALL_CAP)
    batches, windows = list(hand_made_batches(4, 30)), list(hand_made_windows(4, 30))
    sgd, adam_model = start_model(), start_model()
    adam = torch.optim.SparseAdam(list(adam_model.parameters()), lr=0.01)
    stats = []
    for i, (batch, window) in enumerate(zip(batches, windows)):
        if i == len(batches) - 1:  # what the ranks had together on the last step: all but rank 1's rows
            batch, window = ([torch.cat([t[r::world_size] for r in range(world_size) if r != 1]) for t in ts]
                             for ts in (batch, window))
        stats.append(sgd.window_step(*window, lr=0.1).double())
        adam.zero_grad(set_to_none=True)
        adam_model(*batch).backward()
        adam.step()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    for name, reference in (("sgd", sgd), ("sgd_tensors", sgd), ("adam", adam_model)):
        for key, expected in reference.state_dict().items():
            for other in ranks[1:]:
                assert torch.equal(ranks[0][name][key], other[name][key]), (name, key)  # bit-identical ranks
            torch.testing.assert_close(ranks[0][name][key], expected, atol=1e-5, rtol=1e-5)
            assert not torch.equal(expected, start_model().state_dict()[key])  # the steps did change it
    for rank in ranks:
        torch.testing.assert_close(rank["stats"], torch.stack(stats), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(rank["tensor_stats"], torch.stack(stats), rtol=1e-5, atol=1e-4)


def _averager_worker(rank, world_size, block_momentum, exchange, out_dir):
    model = start_model()
    averager = distributed.Averager(model, block_momentum, exchange)
    for i, window in enumerate(hand_made_windows(7, 6, seed=10 + rank)):  # each rank its own data
        if i and i % 2 == 0:
            agreed = averager.sync_point(stop_signal=2 if (rank == 1 and i == 2) else 0)
            assert agreed == (0 if i != 4 else 2 if rank == 1 else signal.SIGTERM), (rank, i, agreed)
        if i % 2 == 1:
            averager.send_point()
        model.window_step(*window, lr=0.1)
    averager.finish()
    assert averager.mode == ("dense" if exchange == "auto" else exchange)  # auto: most of the 40 rows change
    torch.save(model.state_dict(), out_dir / f"rank{rank}.pt")


def mean_over_changing_ranks(sent, changed):
    """Each row's sum of what the ranks sent (bfloat16 values, summed as a bfloat16 all-reduce of 2
    ranks sums them), divided by the number of ranks that changed the row (kept if none did)."""
    total = sent[0]
    for part in sent[1:]:
        total = (total.float() + part.float()).bfloat16()
    return total.float() / torch.stack(changed).sum(0).clamp(min=1).unsqueeze(1)


def averaged_reference(block_momentum, world_size=2):
    """The --async protocol, written plainly: every 2 steps each rank sends what it learnt that the
    consensus has not heard of (its changes since it last sent, plus what the bfloat16 rounding
    of its last send left out), rounded to bfloat16, and takes the consensus plus all of it; a
    sent round reaches the consensus one sync point later, through the block momentum; the end
    adds the pending and the last round. Returns the final parameters and how many rows only one
    rank changed in some round."""
    models = [start_model() for _ in range(world_size)]
    consensus = {k: v.clone() for k, v in models[0].state_dict().items()}
    momentum = {k: torch.zeros_like(v) for k, v in consensus.items()}
    sent_from = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    unsent = [{k: torch.zeros_like(v) for k, v in consensus.items()} for _ in models]
    data = [list(hand_made_windows(7, 6, seed=10 + r)) for r in range(world_size)]
    pending, lone_rows = None, 0

    def send(flush=False):
        rounds = []
        for m, sent, left in zip(models, sent_from, unsent):
            mine = {}
            for k, v in m.state_dict().items():
                progress = v - sent[k]
                learnt = progress + left[k]
                changed = progress.ne(0).any(dim=1)
                going = (changed | flush).unsqueeze(1)  # an unchanged row's leftover waits for its next change
                rounded = torch.where(going, learnt, 0.0).bfloat16()
                left[k] = torch.where(going, (learnt - rounded.float()).bfloat16().float(), left[k])
                mine[k] = (rounded, changed)
                v.copy_(consensus[k] + learnt)
                sent[k] = v.clone()
            rounds.append(mine)
        return rounds

    def receive(rounds):
        nonlocal lone_rows
        for k in consensus:
            changed = [r[k][1] for r in rounds]
            mean = mean_over_changing_ranks([r[k][0] for r in rounds], changed)
            momentum[k] = block_momentum * momentum[k] + mean
            consensus[k] += momentum[k]
            lone_rows += int(torch.stack(changed).sum(0).eq(1).sum())

    for i in range(7):
        if i and i % 2 == 0:
            if pending:
                receive(pending)
            pending = send()
        for m, windows in zip(models, data):
            m.window_step(*windows[i], lr=0.1)
    receive(pending)
    receive(send(flush=True))
    return consensus, lone_rows


@pytest.mark.parametrize("block_momentum, exchange", [(0.0, "auto"), (0.5, "auto"), (0.5, "sparse")])
def test_async_exchange_moves_rows_by_the_momentum_of_the_mean_change_of_the_ranks_that_changed_them(
        tmp_path, block_momentum, exchange):
    """After finish() every rank holds what the plainly written protocol gives: each round, a row's
    mean change over the ranks that changed it (a row one rank alone changed keeps that rank's
    whole change) feeds the block momentum, applied one sync point later. And a stop signal
    raised at one sync point is agreed by all ranks at the next. The dense exchange (auto picks
    it: most rows change) and the sparse one, whose rows are found by comparison here."""
    run_ranks(_averager_worker, block_momentum, exchange, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    expected, lone_rows = averaged_reference(block_momentum)
    assert lone_rows > 0  # the case that differs from a plain average does occur
    for key, value in expected.items():
        assert torch.equal(ranks[0][key], ranks[1][key])
        assert not torch.equal(value, start_model().state_dict()[key])
        torch.testing.assert_close(ranks[0][key], value, atol=1e-6, rtol=1e-6)


SPARSE_VOCAB = 500


def kernel_steps(rank, n_steps=9, centers=12):
    """A rank's own text for the compiled kernel: Zipf-like word ids over SPARSE_VOCAB words, in steps
    of `centers` tokens; and a negative sampler over all the ranks' counts (the same on every rank)."""
    def text(r):
        return (np.random.default_rng(20 + r).zipf(1.3, n_steps * centers) % SPARSE_VOCAB).astype(np.uint32)
    counts = np.bincount(np.concatenate([text(0), text(1)]), minlength=SPARSE_VOCAB) + 1
    return text(rank), data.NegativeSampler(counts, 0.75)


def _exchange_worker(rank, world_size, out_dir):
    """Each rank trains its own text with the compiled kernel (which marks the rows it writes),
    exchanging every 2 steps, once with each exchange and wire; rank 1 trains nothing in steps 2-3."""
    ids, sampler = kernel_steps(rank)
    bounds = np.array([0, len(ids)], dtype=np.int64)
    results = {}
    for block_momentum in (0.0, 0.5):
        for wire in (torch.float32, torch.bfloat16):
            for exchange in ("dense", "sparse", "auto"):
                torch.manual_seed(3)
                model = SGNS(SPARSE_VOCAB, DIM)
                averager = distributed.Averager(model, block_momentum, exchange, wire_dtype=wire)
                in_w, out_w = (p.data.numpy() for p in (model.in_embed.weight, model.out_embed.weight))
                marks = averager.row_marks(model.in_embed.weight, model.out_embed.weight)
                for step in range(9):
                    if step and step % 2 == 0:
                        averager.sync_point(0)
                    if step % 2 == 1:
                        averager.send_point()
                    if rank == 1 and step in (2, 3):
                        continue  # touches no row in this interval
                    cpu_kernel.train(in_w, out_w, ids, bounds, [12 * step, 12 * step + 12], step, 7 + rank,
                                     [0.1, 0.1], 2, NEG, sampler, marks)
                averager.finish()
                name = f"{block_momentum}-{str(wire)[6:]}-{exchange}"
                results[name] = model.state_dict()
                results[name + "-mode"] = averager.mode
                results[name + "-rows"] = averager.stats.rows / averager.stats.exchanges
    torch.save(results, out_dir / f"rank{rank}.pt")


def test_the_sparse_exchange_gives_the_dense_exchange_s_parameters_bit_for_bit(tmp_path):
    """The sparse exchange (only the rows some rank changed, marked by the compiled kernel) ends
    with the same parameters as the dense one, bit for bit, with float32 or bfloat16 on the wire,
    with and without momentum; a rank that changed no row in an interval still takes part (it
    receives the other's rows and ends equal to it); and the automatic choice picks the sparse
    exchange when few of the rows change."""
    run_ranks(_exchange_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    start = SGNS(SPARSE_VOCAB, DIM).state_dict()
    for name in (f"{m}-{w}" for m in (0.0, 0.5) for w in ("float32", "bfloat16")):
        assert ranks[0][f"{name}-auto-mode"] == "sparse"
        assert ranks[0][f"{name}-sparse-rows"] < SPARSE_VOCAB / 2 < 2 * SPARSE_VOCAB == ranks[0][f"{name}-dense-rows"]
        for key, dense in ranks[0][f"{name}-dense"].items():
            for rank in ranks:
                for exchange in ("dense", "sparse", "auto"):
                    assert torch.equal(rank[f"{name}-{exchange}"][key], dense), (name, exchange, key)
        assert not torch.equal(dense, start[key])


def test_the_automatic_exchange_is_dense_when_most_rows_travel():
    assert distributed.choose_exchange(dense_bytes=1000, sparse_bytes=900) == "dense"
    assert distributed.choose_exchange(dense_bytes=1000, sparse_bytes=500) == "sparse"


def engine_args(**overrides):
    """The run options an engine reads, for a small test run."""
    return argparse.Namespace(**{**dict(seed=1, batch_size=64, window_size=3, neg_sample_size=3, epochs=4, lr=0.025,
                                        ns_exponent=0.75, subsample_th=0.0, multi_gpu=False, model_name="sgns",
                                        gpu_kernel=True, cuda_graph=True), **overrides})


def make_engine(corpus, rank, world_size, mode, loop, optimizer_name="sgd", **overrides):
    """An Engine of a 2-rank run (mode sync/async), a fresh SGNS model and its optimizer."""
    args = engine_args(**overrides)
    torch.manual_seed(1)
    model = SGNS(len(corpus.words), 16)
    optimizer = torch.optim.SparseAdam(list(model.parameters()), lr=0.01) if optimizer_name == "sparse_adam" else None
    world = gloo_world(rank, world_size)
    strategy = distributed.SyncRanks(world) if mode == "sync" else distributed.AsyncRanks(world, 5, 0.0)
    return engines.Engine(args, model, optimizer, corpus, strategy, loop, "cpu")


class StepRecorder:
    """An epoch's `report`: counts steps, sums the loss and pairs, keeps the last position."""

    def __init__(self):
        self.steps, self.position, self.loss, self.pairs = 0, 0, 0.0, 0

    def __call__(self, steps_done, loss_sum, pairs, words, lr):
        self.steps += 1
        self.position = steps_done
        self.loss += float(loss_sum)
        self.pairs += int(pairs)


EPOCH_MODES = {"sync": ("sync", "window", "sgd"), "async": ("async", "window", "sgd"),
               "async-kernel": ("async", "kernel", "sgd"), "sync-sparse_adam": ("sync", "autograd", "sparse_adam")}


def _epoch_worker(rank, world_size, corpus_file, cache_dir, mode, out_dir):
    corpus = data.load_corpus(str(corpus_file), cache_dir=str(cache_dir), min_count=1)
    engine = make_engine(corpus, rank, world_size, *EPOCH_MODES[mode])
    losses = []
    for epoch in range(engine.args.epochs):
        report = StepRecorder()
        assert engine.run(epoch, 0, report, lambda: 0) == 0
        losses.append(report.loss / report.pairs)
    torch.save({"model": engine.model.state_dict(), "losses": torch.tensor(losses)}, out_dir / f"rank{rank}.pt")


@pytest.mark.parametrize("mode", ["sync", "async", "async-kernel", "sync-sparse_adam"])
def test_distributed_epochs_learn_and_end_with_identical_parameters(tmp_path, mode):
    corpus_file = write_small_corpus(tmp_path / "small.txt", n_sentences=300)
    run_ranks(_epoch_worker, corpus_file, tmp_path / "cache", mode, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for key in ranks[0]["model"]:
        assert torch.equal(ranks[0]["model"][key], ranks[1]["model"][key])
    losses = ranks[0]["losses"]
    assert losses[-1] < losses[0] - 0.1, losses


def _resume_worker(rank, world_size, corpus_file, cache_dir, out_dir):
    corpus = data.load_corpus(str(corpus_file), cache_dir=str(cache_dir), min_count=1)
    models = []
    for stop_at in (None, 37):  # 37: in the middle of the second draw of steps
        engine = make_engine(corpus, rank, world_size, "sync", "window", epochs=1, subsample_th=1e-2)
        report = StepRecorder()
        stop_signal = lambda: 2 if stop_at is not None and report.steps >= stop_at else 0  # noqa: E731
        if engine.run(0, 0, report, stop_signal):
            assert report.position == stop_at + 1  # the agreed step is made, then the ranks stop
            assert engine.run(0, report.position, report, lambda: 0) == 0
        models.append(engine.model.state_dict())
    torch.save({"straight": models[0], "resumed": models[1]}, out_dir / f"rank{rank}.pt")


def test_a_stopped_and_resumed_distributed_epoch_equals_an_uninterrupted_one(tmp_path):
    corpus_file = write_small_corpus(tmp_path / "small.txt", n_sentences=300)
    run_ranks(_resume_worker, corpus_file, tmp_path / "cache", tmp_path)
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key, expected in result["straight"].items():
            torch.testing.assert_close(result["resumed"][key], expected, atol=1e-6, rtol=1e-6)


def _kernel_stop_worker(rank, world_size, corpus_file, cache_dir, out_dir):
    corpus = data.load_corpus(str(corpus_file), cache_dir=str(cache_dir), min_count=1)
    engine = make_engine(corpus, rank, world_size, "async", "kernel", epochs=1)
    engine.strategy.sync_interval = 2
    report = StepRecorder()
    # only rank 0 is asked to stop (after its 3rd step): both must stop at the same place
    stop_signal = lambda: 15 if rank == 0 and report.steps >= 3 else 0  # noqa: E731
    stop = engine.run(0, 0, report, stop_signal)
    torch.save({"stop": stop, "position": report.position, "model": engine.model.state_dict()},
               out_dir / f"rank{rank}.pt")


def test_an_async_kernel_epoch_stops_on_all_ranks_at_the_same_stretch_with_equal_parameters(tmp_path):
    corpus_file = write_small_corpus(tmp_path / "small.txt", n_sentences=300)
    run_ranks(_kernel_stop_worker, corpus_file, tmp_path / "cache", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["stop"] == ranks[1]["stop"] == 15
    assert ranks[0]["position"] == ranks[1]["position"] < 20
    for key in ranks[0]["model"]:
        assert torch.equal(ranks[0]["model"][key], ranks[1]["model"][key])


def test_data_parallel_path_equals_sgd_on_sparse_gradients(tmp_path):
    """--multi-gpu trains dense tables through nn.DataParallel with autograd SGD; on a CPU machine
    DataParallel runs the module as is, so the same epoch must match SGD on sparse gradients."""
    corpus = data.load_corpus(str(write_small_corpus(tmp_path / "s.txt", 200)), cache_dir=str(tmp_path), min_count=1)
    results = []
    for dense in (False, True):
        args = engine_args(epochs=1, lr=0.05, multi_gpu=True)  # plain SGD on the summed loss, both
        torch.manual_seed(1)
        model = SGNS(len(corpus.words), 16, sparse=not dense)
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
        engine = engines.Engine(args, model, optimizer, corpus, distributed.OneProcess(dense, 2), "autograd", "cpu")
        assert isinstance(engine.train_model, torch.nn.DataParallel) == dense
        engine.run(0, 0, StepRecorder(), lambda: 0)
        results.append(model.state_dict())
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], atol=1e-5, rtol=1e-4)


RNN_WORDS = ["cat", "cats", "dog", "dogs", "car", "cars", "bus", "buses", "tram", "trams", "the", "a"]


def rnn_model():
    torch.manual_seed(5)
    return RNNSGNS(RNN_WORDS, 6, char_embed_size=5, hidden_size=7)


def rnn_batches(n_steps, batch, seed=4):
    rng = np.random.default_rng(seed)
    vocab = len(RNN_WORDS)
    return [tuple(torch.from_numpy(a) for a in (rng.integers(0, vocab, batch), rng.integers(0, vocab, batch),
                                                rng.integers(0, vocab, (batch, NEG)))) for _ in range(n_steps)]


def _ddp_worker(rank, world_size, out_dir):
    torch.use_deterministic_algorithms(True)
    model = rnn_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    strategy = distributed.SyncRanks(gloo_world(rank, world_size))
    ddp = strategy.wrap(model)
    assert isinstance(ddp, torch.nn.parallel.DistributedDataParallel)
    engine = autograd_engine(model, optimizer, strategy, ddp)
    batches = rnn_batches(4, 14)
    # uneven shares: rank r takes rows r::world_size; rank 1 has no pairs at the last step and joins early
    my_steps = len(batches) - 1 if rank == 1 else len(batches)
    after_each_step = []
    with strategy.uneven_steps(ddp, len(batches), my_steps) as steps_to_run:
        for step in range(steps_to_run):
            local = [t[rank::world_size] for t in batches[step]]
            engines._autograd_step(engine, local, 0.01, 0)
            after_each_step.append({k: v.clone() for k, v in model.state_dict().items()})
    assert strategy.on_epoch_end(0) == 0
    after_each_step.append({k: v.clone() for k, v in model.state_dict().items()})
    torch.save(after_each_step, out_dir / f"rank{rank}.pt")


def test_ddp_ranks_train_the_rnn_model_as_one_process_on_the_global_batch(tmp_path):
    """2 Gloo ranks train the rnn model through DistributedDataParallel: after each step their
    parameters equal one process's trained by Adam on the global batch, the last step (which
    leaves rank 1 without pairs: it joins early, DDP's join()) included."""
    run_ranks(_ddp_worker, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    model = rnn_model()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    batches = rnn_batches(4, 14)
    for step, batch in enumerate(batches):
        if step == len(batches) - 1:  # what the ranks had together on the last step: rank 0's rows only
            batch = [t[0::2] for t in batch]
        optimizer.zero_grad()
        model(*batch).backward()
        optimizer.step()
        for key, expected in model.state_dict().items():
            torch.testing.assert_close(ranks[0][min(step, len(ranks[0]) - 1)][key], expected, atol=1e-5, rtol=1e-4)
            if step < len(batches) - 1:
                torch.testing.assert_close(ranks[1][step][key], expected, atol=1e-5, rtol=1e-4)
    for key, expected in model.state_dict().items():
        assert not torch.equal(expected, rnn_model().state_dict()[key])
        torch.testing.assert_close(ranks[1][-1][key], expected, atol=1e-5, rtol=1e-4)  # equal again at the end


# ---------------------------------------------------------------------------------------------
# The command line

def trainer_cmd(tmp_path, corpus_file, *extra):
    return [sys.executable, str(ROOT / "trainer.py"), *base_args(tmp_path, corpus_file, "--pip-interval", "0",
                                                                  "--batch-size", "64", *extra)]


def test_two_trainer_processes_sync_run_and_only_rank_0_writes(tmp_path):
    corpus_file = write_small_corpus(tmp_path / "small.txt")
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(trainer_cmd(tmp_path, corpus_file, "--epochs", "2", "--run-name", "d",
                                          "--export", str(tmp_path / f"v{r}.txt"), "--multi-node", "--init-method",
                                          init, "--rank", str(r), "--world-size", "2", "--dist-timeout", "30"),
                              env=clean_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert outputs[1][0] == ""  # rank 1 prints nothing
    runs = list((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == ["d"]
    ckpt = torch.load(runs[0] / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and (tmp_path / "v0.txt").exists() and not (tmp_path / "v1.txt").exists()
    assert ckpt["history"]["Train loss"][1][1] < ckpt["history"]["Train loss"][0][1]


@pytest.mark.parametrize("mode", ["--sync", "--async"])
def test_two_trainer_processes_train_the_rnn_model(tmp_path, mode):
    """The rnn model on several processes trains by autograd steps (DDP for --sync), its loss falling."""
    corpus_file = write_small_corpus(tmp_path / "small.txt")
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(trainer_cmd(tmp_path, corpus_file, "--epochs", "2", "--run-name", "d", "--model-name",
                                          "rnn", "--hidden-size", "8", "--char-embed-size", "4", mode, "--multi-node",
                                          "--init-method", init, "--rank", str(r), "--world-size", "2",
                                          "--dist-timeout", "30"),
                              env=clean_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    ckpt = torch.load(tmp_path / "runs" / "d" / "checkpoint.pt", weights_only=True)
    assert ckpt["args"]["loop"] == "autograd" and ckpt["epoch"] == 2
    assert ckpt["history"]["Train loss"][1][1] < ckpt["history"]["Train loss"][0][1]


def test_torchrun_launch_async_completes(tmp_path):
    corpus_file = write_small_corpus(tmp_path / "small.txt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *trainer_cmd(
               tmp_path, corpus_file, "--epochs", "2", "--run-name", "tr", "--multi-node", "--async",
               "--sync-interval", "3", "--dist-timeout", "30")[1:]]
    result = subprocess.run(cmd, env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    ckpt = torch.load(tmp_path / "runs" / "tr" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["dist_mode"] == "async" and ckpt["args"]["engine"] == "kernel"
    # a tiny corpus with an exchange every 3 steps spends most of its time exchanging: said once, by rank 0
    assert result.stdout.count("a larger --sync-interval trains faster") == 1, result.stdout


def _rank_0_says_worker(rank, world_size, out_dir):
    said = [distributed.rank_0_says("stop after epoch 3" if rank == 0 else None),
            distributed.rank_0_says(None if rank == 0 else "only rank 1 thinks so")]
    (out_dir / f"said{rank}").write_text(json.dumps(said))


def test_every_rank_acts_on_what_rank_0_decides(tmp_path):
    """Only rank 0 computes the PIP loss, so its early-stop decision is every rank's."""
    run_ranks(_rank_0_says_worker, tmp_path)
    for rank in range(2):
        assert json.loads((tmp_path / f"said{rank}").read_text()) == ["stop after epoch 3", None]


def test_interval_hint_above_a_quarter_of_the_epoch():
    assert distributed.interval_hint(0.2, 50) is None
    message = distributed.interval_hint(0.4, 50)
    assert "40%" in message and "--sync-interval 50 steps" in message


def test_a_killed_rank_makes_the_other_exit_within_the_timeout(tmp_path):
    corpus_file = write_small_corpus(tmp_path / "small.txt")
    init = f"tcp://127.0.0.1:{free_port()}"
    procs = [subprocess.Popen(trainer_cmd(tmp_path, corpus_file, "--epochs", "1000", "--multi-node", "--init-method",
                                          init, "--rank", str(r), "--world-size", "2", "--dist-timeout", "10"),
                              env=clean_env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    assert procs[0].stdout.readline().startswith("run directory")  # rank 0 is up: both joined the group
    procs[0].stdout.readline()
    time.sleep(2)  # now training
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    _, err = procs[0].communicate(timeout=60)
    assert procs[0].returncode == 1
    assert time.time() - killed_at < 10 + 5
    assert err.strip().count("\n") == 0 and "rank 0 of 2" in err, err
    procs[1].wait()


def test_a_rank_that_cannot_connect_fails_within_the_timeout(tmp_path):
    corpus_file = write_small_corpus(tmp_path / "small.txt")
    start = time.time()
    result = subprocess.run(trainer_cmd(tmp_path, corpus_file, "--multi-node", "--init-method",
                                        f"tcp://127.0.0.1:{free_port()}", "--rank", "1", "--world-size", "2",
                                        "--dist-timeout", "3"),
                            env=clean_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and time.time() - start < 3 + 20
    assert result.stderr.strip().count("\n") == 0 and "rank 1 of 2" in result.stderr, result.stderr


def _native_threads():
    return len(os.listdir("/proc/self/task"))


def _leave_worker(rank, world_size, init, out_dir):
    torch.set_num_threads(1)
    before = _native_threads()
    distributed.join_group("gloo", init, rank, world_size, timeout=30)
    torch.optim.SparseAdam(list(start_model().parameters()), lr=0.01)  # imports torch._dynamo: see join_group
    finished = distributed.leave_together()
    dist.destroy_process_group()
    del finished
    (out_dir / f"threads{rank}").write_text(f"{before} {_native_threads()}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc (Linux)")
def test_leaving_the_group_ends_its_threads_even_after_an_optimizer_was_made(tmp_path):
    """The threads of a Gloo group that outlive the interpreter aborted ranks at exit; a group joined by
    join_group is gone after destroy_process_group, even if torch.optim was first used inside it."""
    mp.start_processes(_leave_worker, args=(2, f"tcp://127.0.0.1:{free_port()}", tmp_path), nprocs=2,
                       start_method="spawn")
    for rank in range(2):
        before, after = (tmp_path / f"threads{rank}").read_text().split()
        assert after == before


def _idle_io_worker(rank, world_size, out_dir):
    moved = distributed.idle_gloo_io_thread()
    policies = {tid: (open(f"/proc/self/task/{tid}/comm").read().strip(), os.sched_getscheduler(int(tid)))
                for tid in os.listdir("/proc/self/task")}
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)  # the group still talks through its idle I/O thread
    (out_dir / f"idle{rank}").write_text(json.dumps({"moved": moved, "policies": policies, "total": total.item()}))


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE") or not os.path.isdir("/proc/self/task"),
                    reason="SCHED_IDLE and /proc (Linux)")
def test_sync_runs_put_only_the_gloo_io_thread_under_sched_idle(tmp_path):
    run_ranks(_idle_io_worker, tmp_path)
    for rank in range(2):
        report = json.loads((tmp_path / f"idle{rank}").read_text())
        io_threads = [policy for name, policy in report["policies"].values() if name == "gloo_tcp_loop"]
        others = [policy for name, policy in report["policies"].values() if name != "gloo_tcp_loop"]
        assert report["moved"] == len(io_threads) >= 1
        assert set(io_threads) == {os.SCHED_IDLE} and os.SCHED_IDLE not in others
        assert report["total"] == 3.0


@pytest.mark.parametrize("flags,message", [
    (["--multi-node", "--init-method", "nccl://x", "--rank", "0", "--world-size", "2"], "tcp://"),
    (["--multi-node"], "torchrun"),
    (["--multi-node", "--init-method", "tcp://127.0.0.1:1", "--rank", "2", "--world-size", "2"], "--rank 2"),
    (["--multi-gpu", "--num-gpu", "2"], "2 CUDA device(s) asked for, 0 visible"),
    (["--multi-node", "--backend", "nccl", "--init-method", "tcp://h:1", "--rank", "0", "--world-size", "1"], "nccl"),
    (["--async"], "--multi-node"),
    (["--multi-node", "--init-method", "tcp://h:1", "--rank", "0", "--world-size", "2", "--engine", "kernel"],
     "with --multi-node --async"),
    (["--multi-node", "--async", "--init-method", "tcp://h:1", "--rank", "0", "--world-size", "2",
      "--block-momentum", "1"], "must be in [0, 1)"),
    (["--multi-node", "--init-method", "tcp://h:1", "--rank", "0", "--world-size", "2", "--block-momentum", "0.5"],
     "--block-momentum goes with --multi-node --async"),
    (["--multi-node", "--init-method", "tcp://h:1", "--rank", "0", "--world-size", "2", "--async-exchange", "dense"],
     "--async-exchange goes with --multi-node --async"),
])
def test_bad_distributed_flags_are_one_line_exit_2(flags, message, monkeypatch, capsys):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit) as exit_info:
        trainer.parse_args(["--dataset", "x.txt", *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in err, err


def test_torchrun_environment_is_used_when_flags_are_absent(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1234")
    args = trainer.parse_args(["--multi-node", "--dataset", "x.txt"])
    world = args.world
    assert (world.rank, world.world_size, world.init_method, world.backend) == (1, 3, "env://", "gloo")
    assert args.engine == "torch" and args.loop == "window" and args.quiet  # only rank 0 shows progress
    assert trainer.parse_args(["--dataset", "x.txt"]).world is None


@pytest.mark.parametrize("flags,interval", [
    ([], 50),
    (["--batch-size", "8192"], 50),
    (["--batch-size", "1024"], 200),
    (["--batch-size", "1000"], 205),
    (["--batch-size", "1024", "--sync-interval", "7"], 7),
])
def test_async_interval_defaults_to_50_steps_and_at_least_50_steps_of_the_default_batch(flags, interval, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    args = trainer.parse_args(["--dataset", "x.txt", "--multi-node", "--async", "--init-method", "tcp://h:1",
                               "--rank", "0", "--world-size", "2", *flags])
    assert args.sync_interval == interval


def exchange_pass_inputs(wire, block_momentum, in_place, g):
    """The arguments of an exchange pass over some of 40 rows x 7: rows this rank changed (and one
    with a single changed entry), rows it did not, received sums from 0-2 ranks, what an earlier
    rounding left unsent, rows whose momentum still moves. in_place: the dense exchange's form,
    every row with its own slot in one buffer."""
    n_rows, width = 40, 7
    sent_from = torch.randn(n_rows, width, generator=g)
    values = sent_from.clone()
    values[::3] += torch.randn(len(values[::3]), width, generator=g) * 0.01  # the rows this rank changed
    values[1, 2] = sent_from[1, 2] + 1e-3
    unsent = (torch.randn(n_rows, width, generator=g) * 1e-5).bfloat16()
    unsent[::2] = 0.0  # rows with nothing left from an earlier exchange
    state = torch.where((unsent != 0).any(dim=1), cpu_kernel.PENDING, 0).to(torch.uint8)  # as the passes keep it
    state[::5] |= cpu_kernel.ALIVE
    if in_place:
        rows = recv_slots = send_slots = torch.arange(n_rows)
    else:
        rows = torch.tensor([r for r in range(n_rows) if r % 3 == 0 or r % 4 == 1 or r % 5 == 0 or r == 1])
        recv_slots = torch.where(rows % 4 == 1, torch.arange(len(rows)), -1)  # the received rows, in order
        recv_slots[recv_slots >= 0] = torch.arange(int((recv_slots >= 0).sum()))
        mine = (rows % 3 == 0) | (rows == 1) | (rows % 5 == 0)  # the changed rows and some unchanged ones
        send_slots = torch.full((len(rows),), -1)
        send_slots[mine] = torch.arange(int(mine.sum()))
    n_received = int((recv_slots >= 0).sum())
    ranks = torch.randint(0, 3, (n_received,), generator=g).float()  # how many ranks changed each row
    received = (torch.randn(n_received, width, generator=g) * ranks.unsqueeze(1)).to(wire)
    changes = received if in_place else torch.full((int((send_slots >= 0).sum()), width), 7.0).to(wire)
    counts = ranks.to(wire) if in_place else torch.full((len(changes),), 7.0).to(wire)
    momentum = torch.randn(n_rows, width, generator=g) if block_momentum else torch.zeros(0, 1)
    return [values, sent_from, torch.randn(n_rows, width, generator=g), unsent, momentum, block_momentum, rows,
            received, ranks.to(wire), recv_slots, changes, counts, send_slots, state]


@pytest.mark.parametrize("wire", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("block_momentum", [0.0, 0.3])
@pytest.mark.parametrize("in_place", [True, False])
@pytest.mark.parametrize("apply, send, flush", [(True, True, False), (True, False, False), (False, True, False),
                                                (True, True, True)])
def test_compiled_exchange_pass_gives_the_bits_of_the_tensor_pass(wire, block_momentum, in_place, apply, send, flush):
    """cpu_kernel.exchange_rows (CPU runs) against distributed.exchange_rows (GPU runs): same bits,
    dense (in place) or sparse (listed rows and slots), whether a row changed or not, whatever
    number of ranks changed it, with what an earlier rounding left unsent."""
    start = exchange_pass_inputs(wire, block_momentum, in_place, torch.Generator().manual_seed(3))
    by_tensors = [t.clone() if torch.is_tensor(t) else t for t in start]
    if in_place:
        by_tensors[10] = by_tensors[7]
    compiled = [t.clone() if torch.is_tensor(t) else t for t in start]
    if in_place:
        compiled[10] = compiled[7]
    distributed.exchange_rows(*by_tensors, apply, send, flush)
    as_bits = (3, 7, 8, 10, 11)  # unsent and the wire's arrays hold bits
    arrays = [distributed._bits(t) if i in as_bits else t.numpy() if torch.is_tensor(t) else np.float32(t)
              for i, t in enumerate(compiled)]
    cpu_kernel.exchange_rows(*arrays, apply, send, flush)
    for expected, got in zip(by_tensors, compiled):
        if torch.is_tensor(expected):
            assert torch.equal(expected, got)
    values, sent_from, consensus, unsent, _, _, rows, _, _, _, changes, counts, send_slots, _ = by_tensors
    moved = consensus[rows] != start[2][rows]
    assert moved.any() if apply else not moved.any()
    if not send:
        assert torch.equal(values[rows], consensus[rows])
        return
    learnt = start[0] - start[1] + start[3].float()  # progress and what an earlier exchange left unsent
    torch.testing.assert_close(values[rows] - consensus[rows], learnt[rows])  # consensus + all it learnt
    slotted = rows[send_slots >= 0]
    changed = (start[0] != start[1]).any(dim=1)[slotted]
    assert counts[send_slots[send_slots >= 0]].tolist() == changed.float().tolist()
    going = changed | flush
    sent = changes[send_slots[send_slots >= 0]].float() + unsent[slotted].float()
    torch.testing.assert_close(sent[going], learnt[slotted][going], rtol=1e-5, atol=1e-7)
    assert (unsent[slotted][going].float().abs() <= learnt[slotted][going].abs() / 256).all()  # at most 1/256
    assert not changes[send_slots[send_slots >= 0]][~going].any()  # an unchanged row sends nothing ...
    assert torch.equal(unsent[slotted][~going], start[3][slotted][~going])  # ... and keeps its leftover
