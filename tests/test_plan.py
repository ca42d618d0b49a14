"""The measurement plan's operator guard (``plan.CheckedOperator``)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_curvature.operators import DenseOperator
from lightning_curvature.plan import CheckedOperator, NonFiniteError


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_non_finite_entry_anywhere_in_a_product_is_refused(bad, dtype):
    for i in (0, 4, 9):
        A = torch.eye(10, dtype=dtype)
        A[i, i] = bad
        with pytest.raises(NonFiniteError, match="not finite"):
            CheckedOperator(DenseOperator(A)).matvec(torch.ones(10, dtype=dtype))


def test_opposite_infinities_are_refused_though_they_would_cancel_in_a_sum_of_finite_parts():
    A = torch.diag(torch.tensor([math.inf, -math.inf, 1.0]))
    with pytest.raises(NonFiniteError):
        CheckedOperator(DenseOperator(A)).matvec(torch.ones(3))


def test_large_finite_products_pass_and_come_back_unchanged():
    big = torch.finfo(torch.float32).max / 8
    A = torch.diag(torch.tensor([big, -big, 1.0, 0.0]))
    v = torch.ones(4)
    out = CheckedOperator(DenseOperator(A)).matvec(v)
    assert torch.equal(out, A @ v)
    assert torch.equal(CheckedOperator(DenseOperator(A)).matmat(torch.eye(4)), A)
