"""tables.py: SGNS as numpy tables, interchangeable with model.SGNS through their state dicts."""
import numpy as np
import pytest
import torch

import tables
from model import SGNS


def test_the_tables_start_as_word2vec_does_and_the_same_seed_gives_the_same_tables():
    first = tables.Tables(50, 8, seed=3)
    assert first.in_weight.dtype == np.float32 and first.in_weight.shape == (50, 8)
    assert np.abs(first.in_weight).max() <= 0.5 / 8 and first.in_weight.std() > 0.25 / 8 / 2
    assert not first.out_weight.any()
    assert np.array_equal(tables.Tables(50, 8, seed=3).in_weight, first.in_weight)
    assert not np.array_equal(tables.Tables(50, 8, seed=4).in_weight, first.in_weight)


def test_the_tables_and_the_torch_model_load_each_others_weights():
    numpy_model, torch_model = tables.Tables(6, 4, seed=1), SGNS(6, 4)
    torch_model.out_embed.weight.data.normal_()
    numpy_model.load_state_dict(torch_model.state_dict())
    for name, weight in torch_model.state_dict().items():
        assert np.array_equal(numpy_model.state_dict()[name], weight.numpy())
    numpy_model.in_weight += 1.0
    torch_model.load_state_dict({k: torch.from_numpy(v) for k, v in numpy_model.state_dict().items()})
    assert np.array_equal(torch_model.embeddings().numpy(), numpy_model.embeddings())


@pytest.mark.parametrize("weights", [{"in_embed.weight": np.zeros((6, 5), np.float32),
                                      "out_embed.weight": np.zeros((6, 4), np.float32)},
                                     {"in_embed.weight": np.zeros((6, 4), np.float32)}])
def test_weights_of_another_shape_or_model_are_refused_as_torch_refuses_them(weights):
    model = tables.Tables(6, 4, seed=1)
    before = model.in_weight.copy()
    with pytest.raises(RuntimeError):
        model.load_state_dict(weights)
    assert np.array_equal(model.in_weight, before)


def test_the_parameter_count_of_sgns_is_its_two_tables():
    model = tables.Tables(3, 7, seed=0)
    assert tables.parameter_count("sgns", ["a", "b", "c"], 7) == sum(w.size for w in model.parameters())
