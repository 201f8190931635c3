"""gpu_kernel's Triton step (engines.TritonStep) against the tensor step (model.SGNS.window_step). Without a
GPU, Triton's interpreter runs the same kernels on the CPU."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels are defined, so before the import
pytest.importorskip("triton")
import engines  # noqa: E402
import gpu_kernel  # noqa: E402
import model as models  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_case(seed, vocab=40, dim=70, windows=9, window=3, neg=4):
    """A model with non-zero tables and windows shaped as data.WindowBatches makes them; one out row is met
    in every window, and one row only ever sits in padding slots."""
    gen = torch.Generator().manual_seed(seed)
    model = models.SGNS(vocab, dim)
    with torch.no_grad():
        model.out_embed.weight.normal_(0, 0.3, generator=gen)
        model.in_embed.weight.normal_(0, 0.3, generator=gen)
    context_ids = torch.randint(0, vocab - 1, (windows, 2 * window), generator=gen)
    weight = (torch.rand(windows, 2 * window, generator=gen) < 0.7).float()
    context_ids[weight == 0] = vocab - 1  # the padding-only row
    out_ids = torch.randint(0, vocab - 1, (windows, neg + 1), generator=gen)
    out_ids[:, 1] = 3  # a negative drawn by every window
    return model.to(DEVICE), [t.to(DEVICE) for t in (context_ids, weight, out_ids)]


@pytest.mark.parametrize("cap,dim", [(2, 70), (32, 64), (32, 16)])
def test_triton_step_equals_the_tensor_step(monkeypatch, cap, dim):
    """Same update (the row cap included where cap=2 bites) and the same [loss sum, pairs]; rows met only in
    padding slots keep their bits."""
    monkeypatch.setattr(models, "MAX_SUMMED_GRADIENTS", cap)
    expected_model, window = random_case(seed=dim, dim=dim)
    triton_model, _ = random_case(seed=dim, dim=dim)
    start = {key: value.clone() for key, value in triton_model.state_dict().items()}
    for lr in (0.2, torch.tensor(0.1, device=DEVICE)):
        expected = expected_model.window_step(*window, lr)
        stats = engines.TritonStep(triton_model)(*window, lr)  # the cap: models.MAX_SUMMED_GRADIENTS
        torch.testing.assert_close(stats, expected, rtol=1e-5, atol=1e-5)
    for key, value in expected_model.state_dict().items():
        torch.testing.assert_close(triton_model.state_dict()[key], value, rtol=1e-5, atol=1e-6)
        assert not torch.equal(value, start[key])
    assert torch.equal(triton_model.in_embed.weight[-1], start["in_embed.weight"][-1])


def test_no_windows_change_nothing():
    model, (context_ids, weight, out_ids) = random_case(seed=1)
    start = model.in_embed.weight.detach().clone()
    stats = engines.TritonStep(model)(context_ids[:0], weight[:0], out_ids[:0], 0.1)
    assert stats.tolist() == [0.0, 0.0] and torch.equal(model.in_embed.weight, start)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_engine_takes_the_triton_step_on_a_gpu_unless_told_not_to():
    """On a GPU the window loop's step runs gpu_kernel (--gpu-kernel, the default) and gives the
    weights of the tensor step; --no-gpu-kernel runs the tensor step."""
    device = torch.device(DEVICE)
    assert isinstance(engines.choose_window_step(random_case(seed=2)[0], device, gpu_kernel=False), engines.TensorStep)
    with_kernel, window = random_case(seed=2)
    tensor_ops, _ = random_case(seed=2)
    launched = []
    real = gpu_kernel.window_rows
    gpu_kernel.window_rows = lambda *a: launched.append(1) or real(*a)
    try:
        engines.choose_window_step(with_kernel, device)(*window, 0.1)
    finally:
        gpu_kernel.window_rows = real
    tensor_ops.window_step(*window, 0.1)
    assert launched
    for key, value in tensor_ops.state_dict().items():
        torch.testing.assert_close(with_kernel.state_dict()[key], value, rtol=1e-5, atol=1e-6)
