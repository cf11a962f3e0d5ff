"""samnorm.utils.nn: the eval-mode context and the batch splitting shared by scorers, harness and
diagnostics."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from samnorm.utils.nn import batches, eval_mode, is_tensor_pair, split_batch


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_flag_of_every_submodule_even_on_error(training):
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5), nn.BatchNorm1d(2)).train(training)
    with pytest.raises(RuntimeError, match="boom"), eval_mode(net) as m:
        assert m is net and not any(sub.training for sub in net.modules())
        raise RuntimeError("boom")
    assert all(sub.training == training for sub in net.modules())
    with pytest.raises(TypeError, match=r"nn.Module"), eval_mode(lambda x: x):
        pass


@given(n=st.integers(0, 20), size=st.integers(1, 8), labelled=st.booleans())
def test_batches_of_tensors_cover_every_row_once_in_order(n, size, labelled):
    x, y = torch.arange(n * 3.0).view(n, 3), torch.arange(n)
    parts = list(batches((x, y) if labelled else x, size))
    assert [len(b) for b, _ in parts] == [min(size, n - i) for i in range(0, n, size)]
    assert torch.equal(torch.cat([b for b, _ in parts]) if parts else x, x)
    if labelled:
        assert torch.equal(torch.cat([lab for _, lab in parts]) if parts else y, y)
    else:
        assert all(lab is None for _, lab in parts)


def test_loaders_keep_their_own_batches_and_bad_data_is_named():
    loader = [(torch.zeros(2, 3), torch.tensor([0, 1])), [torch.ones(1, 3)], torch.zeros(4, 3)]
    shapes = [(tuple(x.shape), None if y is None else y.tolist()) for x, y in batches(loader, 100)]
    assert shapes == [((2, 3), [0, 1]), ((1, 3), None), ((4, 3), None)]
    with pytest.raises(TypeError, match="image tensors or"):
        list(batches([{"image": torch.zeros(1)}]))
    with pytest.raises(TypeError, match="DataLoader"):
        list(batches(3))
    with pytest.raises(ValueError, match="batch_size"):
        list(batches(torch.zeros(2, 3), 0))
    assert split_batch((torch.zeros(1), "label"))[1] is None  # a non-tensor second entry is no label
    assert not is_tensor_pair((torch.zeros(3, 2), torch.zeros(2)))  # lengths differ
