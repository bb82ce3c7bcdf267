"""The host/device copy helpers return independent copies (on the CPU, where the tests run)."""

import numpy as np
import torch

from textenv.host_transfer import to_device, to_host


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
