import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_curvature.dynamics import UnsupportedOptimizer, adam_preconditioner, stability_info


def _params():
    return [nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2, 2))]


@pytest.mark.parametrize(
    "make,threshold",
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), 20.0),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 38.0),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5), 76.0),
        (lambda p: torch.optim.Adam(p, lr=0.01, betas=(0.9, 0.999)), 3800.0),
        (lambda p: torch.optim.AdamW(p, lr=0.001, betas=(0.8, 0.99)), 18000.0),
    ],
)
def test_thresholds(make, threshold):
    info = stability_info(make(_params()))
    assert info.threshold == pytest.approx(threshold)


def test_weight_decay_coupled_vs_decoupled():
    assert stability_info(torch.optim.SGD(_params(), lr=0.1, weight_decay=0.01)).weight_decay == 0.01
    assert stability_info(torch.optim.Adam(_params(), lr=0.1, weight_decay=0.01)).weight_decay == 0.01
    assert stability_info(torch.optim.AdamW(_params(), lr=0.1, weight_decay=0.01)).weight_decay == 0.0


def test_scheduler_changes_are_followed():
    opt = torch.optim.SGD(_params(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    assert stability_info(opt).threshold == pytest.approx(40.0)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: torch.optim.RMSprop(p, lr=0.1), "RMSprop is not supported"),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), "nesterov"),
        (lambda p: torch.optim.Adam(p, lr=0.1, amsgrad=True), "amsgrad"),
        (lambda p: torch.optim.SGD([{"params": p[:1], "lr": 0.1}, {"params": p[1:], "lr": 0.2}]), "'lr'"),
        (lambda p: torch.optim.SGD(p, lr=0.0), "lr > 0"),
    ],
)
def test_unsupported(make, match):
    with pytest.raises(UnsupportedOptimizer, match=match):
        stability_info(make(_params()))


def test_adam_preconditioner_matches_its_definition():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-6)
    params = list(model.parameters())
    assert adam_preconditioner(opt, params) is None  # no state before the first step
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(model(torch.randn(5, 3)), torch.randn(5, 2)).backward()
        opt.step()
    d = adam_preconditioner(opt, params)
    expected = []
    for p in params:
        st = opt.state[p]
        t = float(st["step"])
        v_hat = st["exp_avg_sq"].double().reshape(-1) / (1 - 0.99**t)
        expected.append(((1 - 0.9**t) * (v_hat.sqrt() + 1e-6)) ** -0.5)
    torch.testing.assert_close(d, torch.cat(expected))
    # Adam's actual step is -lr * P^{-1} m with that P: check on one more step
    before = [p.detach().clone() for p in params]
    opt.zero_grad()
    F.mse_loss(model(torch.randn(5, 3)), torch.randn(5, 2)).backward()
    opt.step()
    d = adam_preconditioner(opt, params)
    m = torch.cat([opt.state[p]["exp_avg"].double().reshape(-1) for p in params])
    step = torch.cat([(p.detach() - b).double().reshape(-1) for p, b in zip(params, before)])
    torch.testing.assert_close(step, -0.01 * d**2 * m, rtol=1e-5, atol=1e-9)
