"""The host/device copy helpers return independent copies, each tensor's own values.

The tests run on the CPU. ``TEXTENV_TEST_DEVICE=cuda`` runs the round trips on a GPU instead (benchmarks/gpu_suite.sh
does), where the copies go through pinned buffers and one wait.
"""

import os

import numpy as np
import torch

from textenv.host_transfer import to_device, to_host

DEVICE = torch.device(os.environ.get("TEXTENV_TEST_DEVICE", "cpu"))


def test_a_round_trip_keeps_each_tensors_values_shape_and_dtype():
    tensors = [torch.arange(6).view(2, 3), torch.tensor([True, False]), torch.linspace(0, 1, 5, dtype=torch.float64)]
    on_device = [to_device(t.numpy(), DEVICE) for t in tensors]
    assert all(t.device.type == DEVICE.type for t in on_device)
    back = to_host(*on_device)
    for original, host in zip(tensors, back, strict=True):
        np.testing.assert_array_equal(host, original.numpy())
        assert host.dtype == original.numpy().dtype
    again = to_device(back[0], DEVICE)  # an array `to_host` returned (pinned on a GPU) goes back as a copy
    back[0][:] = -1
    assert to_host(again)[0].tolist() == [[0, 1, 2], [3, 4, 5]]


def test_to_host_returns_copies_that_do_not_follow_the_tensors():
    a, b = torch.arange(6).view(2, 3), torch.ones(4)
    host_a, host_b = to_host(a, b)
    a.add_(10)
    b.zero_()
    np.testing.assert_array_equal(host_a, np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(host_b, np.ones(4))


def test_to_device_never_shares_an_arrays_memory():
    array = np.array([True, False, True])
    tensor = to_device(array, torch.device("cpu"))
    array[:] = False  # the caller reuses its array: the tensor must keep the values it was given
    assert tensor.tolist() == [True, False, True]
    same = torch.tensor([1, 2])
    assert to_device(same, torch.device("cpu")) is same  # a tensor already there is not copied
