"""Integers and numbers as the argument checks count them: bools are neither, numpy's are."""

import math

import numpy as np
import pytest
import torch

from pyro_bc.checks import is_integer, is_number, require_count


def test_integers_are_python_and_numpy_integers_never_bools():
    assert all(is_integer(v) for v in [0, -3, 2**70, np.int64(3), np.uint8(1)])
    assert not any(is_integer(v) for v in [True, False, 3.0, "3", None, torch.tensor(3)])


def test_numbers_are_reals_never_bools():
    assert all(is_number(v) for v in [0, 0.04, np.float32(0.04), np.int16(2), math.inf, math.nan])
    assert not any(is_number(v) for v in [True, "0.04", None, 1j, torch.tensor(0.04)])


def test_require_count_names_the_argument():
    require_count(np.int64(2), "here: n", minimum=2)
    for wrong in [1, True, 2.0]:
        message = rf"here: n must be an integer of at least 2, got {wrong!r}"
        with pytest.raises(ValueError, match=message):
            require_count(wrong, "here: n", minimum=2)
