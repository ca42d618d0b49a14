"""landscape.py: loss cuts and surfaces along directions, exact on quadratics, forward passes only, plain torch."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from lightning_curvature import HessianOperator, lanczos
from lightning_curvature.landscape import Landscape, landscape_figure, loss_cut, loss_surface

LAMBDAS = torch.tensor([5.0, 2.0, 0.5, -0.3, -1.5, 0.0], dtype=torch.float64)


def _quadratic(seed: int = 0):
    """``L(θ) = ½ (θ − θ*)ᵀ A (θ − θ*) + c`` with ``A = Q diag(LAMBDAS) Qᵀ``, over a dict of two parameters."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    a = q @ torch.diag(LAMBDAS) @ q.T
    star = torch.randn(6, generator=g, dtype=torch.float64)
    c = 0.7

    def loss_fn(p: dict[str, torch.Tensor]) -> torch.Tensor:
        d = torch.cat([p["w"].reshape(-1), p["b"]]) - star
        return 0.5 * d @ a @ d + c

    at_min = {"w": star[:4].reshape(2, 2).clone(), "b": star[4:].clone()}
    return loss_fn, at_min, q, a, star, c


def test_cut_at_the_minimum_is_the_parabola_of_the_eigenvalue():
    loss_fn, params, q, _, _, c = _quadratic()
    alphas = torch.linspace(-2, 2, 9, dtype=torch.float64)
    for k in (0, 4):  # the sharpest direction and a negative-curvature one
        cut = loss_cut(loss_fn, params, q[:, k], alphas, curvature=float(LAMBDAS[k]))
        assert not cut.is_surface and cut.loss == pytest.approx(c, abs=1e-14)
        expected = c + 0.5 * LAMBDAS[k] * alphas**2
        torch.testing.assert_close(cut.losses, expected, rtol=0, atol=1e-12)
        torch.testing.assert_close(cut.quadratic(), expected, rtol=0, atol=1e-12)
        assert cut.num_evaluations == 9  # α = 0 is L(θ), evaluated once


def test_cut_from_a_hessian_operator_and_its_top_eigenvector():
    """The way the callback will call it: op.loss_fn, op.params, op.unflatten and a Lanczos eigenpair."""
    loss_fn, params, *_, c = _quadratic(1)
    op = HessianOperator(loss_fn, params)
    top = lanczos(op, k=1, which="LA", tol=1e-10, generator=torch.Generator().manual_seed(0))
    lam, v = float(top.eigenvalues[0]), top.eigenvectors[:, 0]
    assert lam == pytest.approx(5.0, rel=1e-8)
    theta = op.flatten(op.params)
    cut = loss_cut(op.loss_fn, theta, v, [-1.0, -0.25, 0.0, 0.5], unflatten=op.unflatten, curvature=lam)
    torch.testing.assert_close(cut.losses, c + 0.5 * lam * cut.alphas**2, rtol=0, atol=1e-9)


def test_cut_away_from_the_minimum_with_slope_matches_the_second_order_model():
    loss_fn, params, q, a, star, c = _quadratic(2)
    shift = torch.full((6,), 0.3, dtype=torch.float64)
    theta = {"w": params["w"] + shift[:4].reshape(2, 2), "b": params["b"] + shift[4:]}
    v = q[:, 1]
    slope = float((a @ shift) @ v)  # gᵀv with g = A (θ − θ*)
    cut = loss_cut(loss_fn, theta, v * 3.0, None, curvature=float(LAMBDAS[1]), slope=slope)  # normalised to unit
    assert cut.alphas.tolist() == [i / 10 for i in range(-10, 11)] and cut.num_evaluations == 21
    torch.testing.assert_close(cut.losses, cut.quadratic(), rtol=0, atol=1e-12)
    assert cut.loss == pytest.approx(c + 0.5 * float(shift @ a @ shift))
    raw = loss_cut(loss_fn, theta, v * 3.0, [1.0], normalize=False)
    assert float(raw.losses[0]) == pytest.approx(cut.loss + 3 * slope + 0.5 * LAMBDAS[1].item() * 9, rel=1e-12)


def test_surface_at_the_minimum_is_the_sum_of_two_parabolas():
    loss_fn, params, q, *_, c = _quadratic(3)
    alphas = torch.linspace(-1, 1, 5, dtype=torch.float64)
    betas = torch.tensor([-0.5, 0.0, 0.5, 1.5], dtype=torch.float64)
    surf = loss_surface(loss_fn, params, q[:, :2], alphas, betas, curvatures=LAMBDAS[:2].tolist())
    assert surf.is_surface and surf.losses.shape == (5, 4)
    aa, bb = torch.meshgrid(alphas, betas, indexing="ij")
    expected = c + 0.5 * LAMBDAS[0] * aa**2 + 0.5 * LAMBDAS[1] * bb**2
    torch.testing.assert_close(surf.losses, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(surf.quadratic(), expected, rtol=0, atol=1e-12)
    assert surf.num_evaluations == 20  # the origin is L(θ)
    same = loss_surface(loss_fn, params, [q[:, 0], q[:, 1]], alphas)
    assert same.betas is not None and torch.equal(same.betas, alphas) and same.quadratic() is None


def test_forward_passes_only_and_params_untouched():
    calls = []
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))

    def loss_fn(p):
        calls.append(torch.is_grad_enabled())
        return (p["w"] ** 2).sum()

    before = w.detach().clone()
    cut = loss_cut(loss_fn, {"w": w}, {"w": torch.tensor([0.0, 2.0])}, [-1.0, 1.0])
    assert calls == [False] * 3 and cut.num_evaluations == 3
    assert torch.equal(w.detach(), before) and w.grad is None
    assert cut.losses.tolist() == pytest.approx([1 + 9, 1 + 1])  # w + α e₂ = (1, -3) and (1, -1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alphas": []}, "non-empty 1-D"),
        ({"alphas": [0.0, math.nan]}, "finite"),
        ({"direction": torch.zeros(2)}, "non-zero"),
        ({"direction": torch.ones(3)}, "has 3 entries"),
    ],
)
def test_cut_rejects_bad_arguments(kwargs, message):
    args = {"direction": torch.ones(2), "alphas": [0.5]} | kwargs
    with pytest.raises(ValueError, match=message):
        loss_cut(lambda p: p["w"].sum(), {"w": torch.zeros(2)}, args["direction"], args["alphas"])


def test_other_bad_arguments():
    with pytest.raises(ValueError, match="scalar"):
        loss_cut(lambda p: p["w"] * 2, {"w": torch.zeros(2)}, torch.ones(2), [1.0])
    with pytest.raises(ValueError, match="unflatten"):
        loss_cut(lambda p: p["w"].sum(), torch.zeros(2), torch.ones(2), [1.0])
    with pytest.raises(ValueError, match=r"\(P, 2\)"):
        loss_surface(lambda p: p["w"].sum(), {"w": torch.zeros(2)}, torch.ones(2, 3), [1.0])
    with pytest.raises(ValueError, match="two vectors"):
        loss_surface(lambda p: p["w"].sum(), {"w": torch.zeros(2)}, [torch.ones(2)], [1.0])


def test_json_round_trip_keeps_every_field():
    loss_fn, params, q, *_ = _quadratic(4)
    cut = loss_cut(loss_fn, params, q[:, 0], [-1.0, 0.0, 1.0], curvature=5.0, slope=0.0)
    cut = Landscape(cut.alphas, torch.cat([cut.losses[:2], torch.tensor([math.nan], dtype=torch.float64)]),
                    cut.loss, curvatures=cut.curvatures, slopes=cut.slopes, num_evaluations=cut.num_evaluations)
    back = Landscape.from_json(cut.to_json())
    torch.testing.assert_close(back.losses, cut.losses, equal_nan=True)
    assert (back.loss, back.curvatures, back.slopes, back.num_evaluations) == (cut.loss, (5.0,), (0.0,), 3)
    surf = loss_surface(loss_fn, params, q[:, :2], [-1.0, 1.0], [0.5], curvatures=[5.0, 2.0])
    back = Landscape.from_json(surf.to_json().encode())
    assert torch.equal(back.losses, surf.losses) and torch.equal(back.betas, surf.betas)
    with pytest.raises(ValueError, match="format"):
        Landscape.from_json('{"format": 99}')


def test_figure_draws_cut_and_surface():
    pytest.importorskip("matplotlib")
    loss_fn, params, q, *_ = _quadratic(5)
    for landscape in (loss_cut(loss_fn, params, q[:, 0], curvature=5.0),
                      loss_surface(loss_fn, params, q[:, :2], [-1.0, 0.0, 1.0], curvatures=[5.0, 2.0])):
        fig = landscape_figure(landscape)
        fig.canvas.draw()
        assert fig.axes and fig.axes[0].get_xlabel().startswith(r"$\alpha$")
        assert len(fig.legends) == 1


def test_landscape_imports_neither_lightning_nor_matplotlib():
    code = (
        "import sys, lightning_curvature.landscape;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning', 'matplotlib')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
