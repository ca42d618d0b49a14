"""Stability thresholds of optimizers: what the measured curvature should be compared with.

Plain torch (no Lightning). On a quadratic with curvature ``λ`` along an eigenvector, gradient descent with step
``η`` is stable iff ``η λ < 2``; heavy-ball momentum ``β`` moves the threshold to ``λ < (2 + 2β) / η``. Cohen et al.
(2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability") observed that full-batch
training drives the sharpness ``λ_max`` up to this threshold and keeps it hovering there. For Adam, the relevant
curvature is that of the *preconditioned* Hessian ``P^{-1} H`` and the threshold ``(2 + 2β₁) / (η (1 − β₁))``
(Cohen et al. 2022, "Adaptive Gradient Methods at the Edge of Stability").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .spaces import shard_of, whole_of

__all__ = ["StabilityInfo", "UnsupportedOptimizer", "adam_preconditioner", "stability_info"]

SGD_LIKE = (torch.optim.SGD,)
ADAM_LIKE = (torch.optim.Adam, torch.optim.AdamW)


class UnsupportedOptimizer(ValueError):
    """The optimizer (or its configuration) has no known stability threshold."""


@dataclass
class StabilityInfo:
    """The stability threshold of an optimizer at its current hyperparameters.

    Attributes:
        kind: ``"sgd"`` (compare ``λ_max`` of ``H``) or ``"adam"`` (compare ``λ_max`` of ``P^{-1/2} H P^{-1/2}``).
        threshold: ``(2 + 2β) / (η (1 − d))`` for SGD with momentum ``β`` and dampening ``d``;
            ``(2 + 2β₁) / (η (1 − β₁))`` for Adam/AdamW.
        weight_decay: coupled L2 weight decay (SGD, Adam), which adds ``wd · I`` to the curvature the update sees;
            0 for AdamW (decoupled) and when none.
        lr: the learning rate read from the optimizer.
    """

    kind: str
    threshold: float
    weight_decay: float
    lr: float


def _single_group_value(groups: Sequence[dict], key: str, default: object = None) -> object:
    values = {repr(g.get(key, default)) for g in groups}
    if len(values) > 1:
        raise UnsupportedOptimizer(
            f"parameter groups use different values of {key!r} ({sorted(values)}); one stability threshold needs one"
        )
    return groups[0].get(key, default)


def stability_info(optimizer: torch.optim.Optimizer) -> StabilityInfo:
    """Read the stability threshold of ``optimizer`` from its current ``param_groups``.

    Supported: ``torch.optim.SGD`` (plain, heavy-ball momentum with dampening; not Nesterov), ``Adam`` and ``AdamW``
    (not ``amsgrad``), all parameter groups sharing one learning rate and momentum. The learning rate is read at
    call time, so schedulers are followed.

    Raises:
        UnsupportedOptimizer: for anything else, with the reason.

    Example:
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1, momentum=0.9)
        >>> round(stability_info(opt).threshold, 6)
        38.0
    """
    groups = optimizer.param_groups
    lr = float(_single_group_value(groups, "lr"))  # type: ignore[arg-type]
    if lr <= 0:
        raise UnsupportedOptimizer(f"the learning rate is {lr}; a stability threshold needs lr > 0")
    if isinstance(optimizer, SGD_LIKE):
        if _single_group_value(groups, "nesterov", False):
            raise UnsupportedOptimizer("SGD with nesterov=True is not supported (its threshold differs)")
        beta = float(_single_group_value(groups, "momentum", 0.0))  # type: ignore[arg-type]
        damp = float(_single_group_value(groups, "dampening", 0.0)) if beta > 0 else 0.0  # type: ignore[arg-type]
        wd = float(_single_group_value(groups, "weight_decay", 0.0))  # type: ignore[arg-type]
        return StabilityInfo("sgd", (2 + 2 * beta) / (lr * (1 - damp)), wd, lr)
    if isinstance(optimizer, ADAM_LIKE):
        if _single_group_value(groups, "amsgrad", False):
            raise UnsupportedOptimizer("Adam with amsgrad=True is not supported")
        beta1 = float(_single_group_value(groups, "betas")[0])  # type: ignore[index]
        wd = float(_single_group_value(groups, "weight_decay", 0.0))  # type: ignore[arg-type]
        decoupled = isinstance(optimizer, torch.optim.AdamW) or bool(
            _single_group_value(groups, "decoupled_weight_decay", False)
        )
        return StabilityInfo("adam", (2 + 2 * beta1) / (lr * (1 - beta1)), 0.0 if decoupled else wd, lr)
    raise UnsupportedOptimizer(
        f"{type(optimizer).__name__} is not supported (supported: SGD, Adam, AdamW)"
    )


def adam_preconditioner(optimizer: torch.optim.Optimizer, params: Sequence[Tensor],
                        local: bool = False) -> Tensor | None:
    r"""The flat diagonal ``P^{-1/2}`` of Adam's preconditioner for ``params`` (in that order).

    ``P = (1 − β₁ᵗ) (diag(√v̂) + ε)`` with the bias-corrected second moment ``v̂ = v / (1 − β₂ᵗ)``, so that Adam's
    step is ``−η P^{-1} m`` with the EMA momentum ``m`` (Cohen et al. 2022, eq. 2).

    **Where Adam has not been, ``P^{-1/2} = 0``.** A coordinate whose second moment is exactly zero has had a zero
    gradient at every step so far (an embedding row of a token never seen), so its momentum is zero too and Adam's
    next step leaves it where it is, whatever the curvature there: it takes no part in the dynamics the
    preconditioned sharpness describes. Taken literally, ``P = (1 − β₁ᵗ) ε`` there would make ``P^{-1/2}`` about
    ``10⁴`` and let such coordinates dominate the top eigenvector (measured: 99.9% of its mass on one unseen row of a
    tiny BERT). Parameters without optimizer state (not stepped yet, or held by no optimizer) are excluded likewise:
    Adam has not moved them. Excluded coordinates contribute eigenvalue 0 to ``P^{-1/2} H P^{-1/2}``.

    Args:
        optimizer: an Adam or AdamW optimizer.
        params: the parameters, in the order of the flat vector.
        local: for sharded (DTensor) parameters, this process's shards only (the optimizer state is sharded like the
            parameters, FSDP2); otherwise whole (gathered).

    Returns:
        ``None`` when no parameter has state yet (before the first step).
    """
    state = optimizer.state
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parts = []
    any_state = False
    for p in params:
        st = state.get(p) if id(p) in group_of else None
        if not st or "exp_avg_sq" not in st:
            numel = (shard_of(p) if local else p).numel()
            parts.append(torch.zeros(numel, dtype=torch.float64, device=p.device))
            continue
        any_state = True
        g = group_of[id(p)]
        beta1, beta2 = g["betas"]
        t = float(whole_of(st["step"]))
        v = st["exp_avg_sq"].detach()
        v = (shard_of(v) if local else whole_of(v)).to(torch.float64).reshape(-1)  # FSDP2: this process's shard
        precond = (1 - beta1**t) * ((v / (1 - beta2**t)).sqrt() + g["eps"])
        parts.append(torch.where(v > 0, precond.rsqrt(), torch.zeros_like(v)))
    if not any_state:
        return None
    return torch.cat(parts)
