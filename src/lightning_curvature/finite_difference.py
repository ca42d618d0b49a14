r"""Hessian-vector products from two ordinary gradients: curvature wherever first-order training runs.

Plain torch (no Lightning import). The exact backends of :class:`~lightning_curvature.operators.HessianOperator`
differentiate the loss twice, which rules out models whose backward is first-order only: ``torch.compile``d
modules (no double backward through compiled graphs), fused attention kernels (flash / memory-efficient SDPA),
custom kernels with a once-differentiable backward, reentrant activation checkpointing (incompatible with
``torch.autograd.grad``), and sharded strategies (FSDP2 ``fully_shard``: ``autograd.grad`` with respect to sharded
DTensor parameters fails, while ``loss.backward()`` fills their sharded ``.grad``).

:class:`FiniteDifferenceOperator` needs nothing but the model's own ``loss.backward()``. Each product is a
central difference of two gradients,

.. math::
    H v \approx \frac{\nabla L(\theta + \varepsilon v) - \nabla L(\theta - \varepsilon v)}{2 \varepsilon},

each gradient computed by the real module with its real parameters temporarily moved to ``θ ± εv`` (Nocedal &
Wright, "Numerical Optimization", 2nd ed., §8.1, "Approximating the Hessian"; the exact product it approximates is
Pearlmutter 1994, "Fast Exact Multiplication by the Hessian").
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from .estimators import _norm
from .isolation import rng_guard
from .spaces import FlatPiece, Piece, ShardedSpace
from .spaces import shard_of as _local
from .spaces import whole_of as _full

try:  # numpy is a torch dependency in practice, but not a hard one
    import numpy as np
except ImportError:  # pragma: no cover
    np = None  # type: ignore[assignment]

__all__ = ["BackendRace", "FiniteDifferenceOperator", "default_relative_step", "fsdp1_layout", "race_backends",
           "sharded_space"]

MODES: tuple[str, ...] = ("eval", "train")
VECTORS: tuple[str, ...] = ("whole", "local")


def default_relative_step(dtype: torch.dtype) -> float:
    """The relative step ``η = u^{1/3}`` that balances truncation and rounding in a central difference.

    ``u = torch.finfo(dtype).eps``: ``η ≈ 4.9e-3`` in float32, ``6.1e-6`` in float64, ``0.1`` in float16. See
    :class:`FiniteDifferenceOperator` for the derivation.
    """
    return float(torch.finfo(dtype).eps) ** (1.0 / 3.0)


def _asymmetry(g_plus: Tensor, g_minus: Tensor, g0: Tensor, space: ShardedSpace | None = None) -> float:
    """``‖D₊ − D₋‖ / ‖D₊ + D₋‖`` with ``D₊ = g(θ+εv) − g(θ)`` and ``D₋ = g(θ) − g(θ−εv)`` (0 when both vanish)."""
    num = float(_norm(g_plus + g_minus - 2.0 * g0, space=space))
    den = float(_norm(g_plus - g_minus, space=space))
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def fsdp1_layout(module: nn.Module) -> dict[int, tuple[FlatPiece, object]]:
    """``id(parameter) → (its FlatPiece, the process group)`` for the parameters FSDP1 shards in ``module``.

    FSDP1 (``FullyShardedDataParallel`` with ``use_orig_params=True``, what Lightning's ``FSDPStrategy`` uses) keeps
    each original parameter, outside forward and backward, as a 1-D view of the range of its flattened entries that
    lies in this process's shard of a flat parameter; the ranges are read from the flat parameter's shard metadata.
    Empty when ``module`` holds no FSDP1 unit that shards (``NO_SHARD`` keeps parameters whole, like DDP).

    Raises:
        ValueError: hybrid sharding (two process groups), or FSDP1 without ``use_orig_params=True`` (its parameters
            are then flat parameters spanning several of the model's).
    """
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel, ShardingStrategy
    except ImportError:  # pragma: no cover - torch without distributed
        return {}
    out: dict[int, tuple[FlatPiece, object]] = {}
    for unit in FullyShardedDataParallel.fsdp_modules(module):
        handle = getattr(unit, "_handle", None)
        if handle is None or unit.sharding_strategy == ShardingStrategy.NO_SHARD:
            continue
        if unit.sharding_strategy not in (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP):
            raise ValueError(f"FSDP1 with sharding_strategy={unit.sharding_strategy.name} (two process groups) is not "
                             "supported; FULL_SHARD and SHARD_GRAD_OP are.")
        flat = handle.flat_param
        if not getattr(handle, "_use_orig_params", False):
            raise ValueError("FSDP1 needs use_orig_params=True (Lightning's FSDPStrategy default) for curvature: "
                             "without it the parameters are flat parameters spanning several of the model's.")
        for param, shape, info in zip(flat._params, flat._shapes, flat._shard_param_infos):
            start = int(info.intra_param_start_idx) if info.in_shard else 0
            length = int(info.numel_in_shard) if info.in_shard else 0
            out[id(param)] = (FlatPiece(tuple(shape), start, length), unit.process_group)
    return out


def sharded_space(params: list[Tensor], module: nn.Module | None = None) -> ShardedSpace:
    """The :class:`~lightning_curvature.spaces.ShardedSpace` of sharded parameters.

    FSDP2 (``fully_shard``): DTensor parameters ``Shard``ed over one 1-D mesh. FSDP1 (``FullyShardedDataParallel``
    with ``use_orig_params=True``, found in ``module``): every parameter in a sharding unit over one process group
    (see :func:`fsdp1_layout`).

    Raises:
        ValueError: the parameters are not all sharded that way (a parameter left whole, different or
            multi-dimensional meshes, a placement other than ``Shard``: replicated entries would be counted once per
            process).
    """
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    layout = fsdp1_layout(module) if module is not None else {}
    if layout and not any(hasattr(p, "to_local") for p in params):
        missing = [i for i, p in enumerate(params) if id(p) not in layout]
        groups = {id(layout[id(p)][1]) for p in params if id(p) in layout}
        if missing or len(groups) != 1:
            raise ValueError("vectors='local' needs every differentiated parameter sharded by FSDP1 over one process "
                             f"group ({len(missing)} parameter(s) are outside every sharding unit); use "
                             "vectors='whole' only where no parameter is sharded.")
        return ShardedSpace([layout[id(p)][0] for p in params], group=layout[id(params[0])][1])
    if not layout and module is not None and not any(hasattr(p, "to_local") for p in params):
        from torch.distributed.fsdp import FullyShardedDataParallel

        if FullyShardedDataParallel.fsdp_modules(module):
            raise ValueError("FSDP1 keeps every parameter whole here (NO_SHARD, which it also uses on one process): "
                             "there is no shard to split the vectors by; use vectors='whole'.")
    meshes = {id(getattr(p, "device_mesh", None)) for p in params}
    if not all(hasattr(p, "to_local") for p in params) or len(meshes) != 1:
        raise ValueError("vectors='local' needs every differentiated parameter sharded (a DTensor, e.g. by FSDP2's "
                         "fully_shard) over one device mesh; use vectors='whole'.")
    mesh = params[0].device_mesh
    if mesh.ndim != 1 or not all(all(isinstance(pl, Shard) for pl in p.placements) for p in params):
        raise ValueError("vectors='local' supports parameters sharded (Shard placements) over a 1-D mesh, as FSDP2 "
                         f"shards them; got a {mesh.ndim}-D mesh with placements "
                         f"{sorted({str(p.placements) for p in params})}. Use vectors='whole'.")
    pieces = []
    for p in params:
        local_shape, offset = compute_local_shape_and_global_offset(p.shape, mesh, p.placements)
        if tuple(local_shape) != tuple(p.to_local().shape):  # padded or uneven layouts we do not know
            raise ValueError(f"a parameter's local shard has shape {tuple(p.to_local().shape)}, not the "
                             f"{tuple(local_shape)} its placements give; use vectors='whole'.")
        pieces.append(Piece(tuple(p.shape), tuple(offset), tuple(local_shape)))
    return ShardedSpace(pieces, group=mesh.get_group())


class FiniteDifferenceOperator:
    r"""The Hessian of a module's loss as a linear operator, from central differences of ordinary gradients.

    ``matvec(v)`` returns

    .. math::
        \widehat{Hv} = \frac{g(\theta + \varepsilon v) - g(\theta - \varepsilon v)}{2 \varepsilon},
        \qquad g = \nabla L \text{ by } \texttt{loss.backward()},

    so every product costs two ordinary forward + backward passes through the real module, whatever they run:
    compiled graphs, fused attention kernels, custom kernels with first-order backward only, reentrant
    checkpointing, sharded parameters. It has the interface of :class:`~lightning_curvature.HessianOperator`
    (``shape``, ``dtype``, ``device``, ``names``, ``numels``, ``params``, ``matvec``, ``matmat``, ``gradient()``,
    ``loss``, ``num_matvecs``, ``flatten``, ``unflatten``, ``release()``, context manager), so every estimator
    accepts it.

    **Choice of ε and its error.** By Taylor's theorem around ``θ`` along a unit direction ``v̂`` with step
    ``h = ε‖v‖``, the even terms cancel in the central difference and

    .. math::
        \widehat{Hv} - Hv = \frac{h^2}{6}\, \nabla^4 L[\hat v, \hat v, \hat v] \, \|v\| + O(h^4)
        \;+\; O\Big(\frac{\delta_g}{\varepsilon}\Big),

    the truncation error of the gradient's central difference (third derivative of ``g = ∇L``, i.e. ``∇⁴L``; the
    one-sided difference ``(g(θ+εv) − g(θ))/ε`` would err by ``(h/2) ∇³L[v̂, v̂]``) plus the rounding error
    ``δ_g ≈ u γ`` of the two computed gradients (``u`` the unit roundoff of the compute dtype, ``γ`` the scale of
    the terms summed into a gradient). Minimising ``h² M/6 + u γ / h`` gives ``h* = (3 u γ / M)^{1/3}``, and an
    error at ``h*`` of order ``u^{2/3}`` relative to ``‖H v‖`` (Gill, Murray & Wright, "Practical Optimization",
    1981, ch. 8; Nocedal & Wright §8.1 for ``u^{1/3}``). If the loss varies on the length scale ``s`` of the
    parameters (``∇ᵏL ~ L₀/sᵏ``) then ``h* ∝ u^{1/3} s``: a step of relative size ``η = u^{1/3}`` per coordinate,
    the classical rule ``h_i = u^{1/3} max(|θ_i|, typ θ_i)`` (Dennis & Schnabel 1983, "Numerical Methods for
    Unconstrained Optimization and Nonlinear Equations", ch. 5) taken along ``v``. The scale is measured per
    parameter tensor ``b`` (``n_b`` entries): ``s_b = √n_b · max(rms(θ_b), τ)``, with ``τ`` the typical entry
    (the rms of the tensor holding the median entry when tensors are sorted by rms), so that tensors near zero
    (fresh biases) are not given a vanishing scale. One scalar ``ε`` must serve every tensor ``v`` touches, and
    the truncation error is driven by the tensor moved most relative to its scale, so

    .. math::
        \varepsilon(v) = \eta \, \min_{b:\, v_b \neq 0} \frac{s_b}{\|v_b\|}:

    no tensor moves by more than ``η`` of its scale. For ``v`` spread like ``θ`` this is ``η ‖θ‖/‖v‖``, the usual
    ``ε ∝ ‖θ‖/‖v‖`` scaling (cf. Andrei 2009, "Accelerated conjugate gradient algorithm with finite difference
    Hessian/vector product approximation for unconstrained optimization"); a ``v`` inside one tensor (a per-layer
    block) gets ``η s_b/‖v_b‖``. (A ``v``-weighted mean of the scales instead lets one large tensor set the step for
    all: on a small transformer language model the embedding table, entries of size 1, made it six times too large
    for the linear layers, error 5e-4 against 5e-5.) The product is exactly homogeneous in ``v`` (``εv`` does
    not depend on ``‖v‖``) but additive only up to the error above. Expected relative error ``~u^{2/3}``, about
    ``1e-5`` in float32; measured ≤ 5e-5 on the float32 test problems (tanh MLP, GELU transformer, LSTM, attention)
    and ≤ 1e-10 in float64.

    **Kinks.** Piecewise-linear activations (ReLU, max-pooling) make ``g`` jump where a pre-activation changes sign.
    A jump inside ``[θ − εv, θ + εv]`` adds ``jump/2ε`` to the product, which the exact Hessian (zero second
    derivative almost everywhere) does not have; with many units some always lie that close to zero, and the errors
    grow roughly like ``η^{-1/2}`` as the step shrinks (measured on a 64-256-256-10 ReLU MLP in float32: 4x ``‖Hv‖``
    at ``η = 2e-2``, 10x at the default, 100x at ``1e-4``; the same network with tanh: 4e-5). The kink check
    (``asymmetry_tol``) detects them from the gradient at ``θ`` (computed once per operator): with
    ``D₊ = g(θ + εv) − g(θ)`` and ``D₋ = g(θ) − g(θ − εv)``, a smooth loss has ``‖D₊ − D₋‖ / ‖D₊ + D₋‖ = O(h)``
    (about ``η``), while a jump on one side makes it ``~ jump/(2ε‖Hv‖)``, the relative error it causes. Above
    ``asymmetry_tol`` the product is taken again with ``ε/10`` (up to ``max_shrinks`` times) and the attempt with the
    smallest asymmetry is returned (the first, largest step if all exceed 0.5: the ratio saturates near 1 when
    jumps dominate, and their error shrinks as the step grows); if none passes, a ``RuntimeWarning`` says so once
    per operator (``max_asymmetry`` records the worst returned value). On the small ReLU test CNNs this brings the
    float32 error from 6 and 21 down to ≤ 2e-3; on large ReLU networks no float32 step is kink-free, and the warning
    is the answer. A kink exactly at ``θ`` is symmetric (``D₊ = D₋``) and goes unseen.

    **Invisible to the caller.** After every product and gradient: parameter values are bit-identical (the
    values before the call are kept and copied back, never recovered by subtracting ``εv``), every parameter's
    ``.grad`` is the user's own tensor again (set to ``None`` before each backward, so nothing accumulates into it),
    buffers are as before (each gradient starts from the same buffers, so BatchNorm running statistics updated by a
    train-mode forward are put back), train/eval flags are as before, and the torch (CPU and CUDA), Python and NumPy
    RNG streams are untouched: each gradient runs on a forked stream reset to the same state, so both gradients of a
    product and all products of one operator see the same dropout masks, one fixed function. Autocast is off; the
    SDPA kernel is left to PyTorch (the fused ones work here).

    **Which Hessian.** ``mode="eval"`` (default): the module in eval mode (BatchNorm uses running statistics,
    dropout off). ``mode="train"``: train mode with the running statistics restored after each gradient and dropout
    masks fixed for the operator's lifetime (the masks drawn by ``seed``, not the training step's). A compiled
    module compiles one more graph the first time it is run in the other mode (dynamo guards on ``training``) and
    reuses it afterwards; ``mode`` equal to the mode it trains in reuses the training graph itself.

    **Dtype.** By default the module runs in its own dtype and the product's vectors have that dtype. A different
    ``dtype`` (e.g. ``torch.float64`` for a float32 module, or float32 for a bfloat16 one) casts the module's
    parameters and floating buffers for the duration of each product by swapping ``.data`` (the original storage is
    never written and is put back); ``closure`` must then cast its inputs (the callback's does). This recompiles a
    compiled module and is refused for sharded (DTensor) parameters: keep the model's dtype there.

    **Sharded parameters** (DTensor, e.g. FSDP2 ``fully_shard``). With ``vectors="whole"`` (default) vectors are whole
    (length ``P`` of the unsharded model) and identical on every process, so estimators run unchanged and take the
    same branches everywhere; each process writes its slice of ``θ ± εv`` into its shards, the strategy's own backward
    fills the sharded ``.grad`` (the gradient of the mean loss over processes, for FSDP), and the two gradients are
    gathered whole. With ``vectors="local"`` each process holds only the entries of its own shards (``shape`` is
    its local length, memory ``O(P / world)`` per vector), reads and writes its shards directly, and the operator
    carries a :class:`~lightning_curvature.spaces.ShardedSpace` (``space``) through which the estimators sum their
    inner products over the processes and draw world-size-invariant probes; the step ``ε`` uses the global norms.
    FSDP1 (``FullyShardedDataParallel`` with ``use_orig_params=True``, ``FULL_SHARD`` or ``SHARD_GRAD_OP``) keeps each
    parameter as a 1-D slice of its flattened entries (:func:`fsdp1_layout`): ``vectors="local"`` works on those
    slices, and whole vectors are refused.
    Every process must build the operator and call every product together (they are collectives). ``loss`` is this
    process's.

    Args:
        module: the real model; ``closure(module)`` must run its forward, e.g. a ``LightningModule`` or a
            ``torch.compile``d module.
        closure: ``closure(module) -> loss``, a scalar tensor computed on a fixed batch, e.g.
            ``lambda m: F.cross_entropy(m(x), y)`` or a call of ``training_step``. It is called once per gradient
            (twice per product); it must not step optimizers or call ``backward`` itself.
        params: the parameters to differentiate, ``name -> nn.Parameter`` of ``module`` (leaves with
            ``requires_grad``); default: every parameter of ``module`` with ``requires_grad``. Other parameters
            still receive gradients from the backward; their ``.grad`` is restored too.
        eps: the relative step ``η`` (default :func:`default_relative_step` of the compute dtype); the step along
            ``v`` is ``ε(v) = η min_b s_b / ‖v_b‖`` (see above).
        dtype: compute dtype (default: the parameters' dtype); see above.
        mode: ``"eval"`` (default) or ``"train"``.
        seed: seed of the RNG stream every gradient runs on (dropout masks in train mode).
        asymmetry_tol: the kink check's threshold (default ``1e-2``); ``None`` switches it off (no gradient at
            ``θ`` is computed, never more than two gradients per product).
        max_shrinks: how many times a product may be retaken with a ten times smaller step (default 2).
        vectors: ``"whole"`` (default) or ``"local"`` (this process's shards of sharded parameters; see above).

    Attributes:
        num_matvecs: products so far (``matmat`` counts one per column).
        num_gradients: forward + backward passes so far (two per product, one for ``gradient()``, two per shrink).
        num_shrinks: products retaken with a smaller step by the kink check.
        max_asymmetry: the largest asymmetry of a returned product.

    Example:
        The seed notebook's closed form: for ``L = (w·x + b − y)²``, ``H = 2 [[x xᵀ, x], [xᵀ, 1]]``; the loss is
        quadratic, so the central difference is exact up to rounding.

        >>> model = nn.Linear(2, 1).double()
        >>> x, y = torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64)
        >>> op = FiniteDifferenceOperator(model, lambda m: ((m(x) - y) ** 2).sum())
        >>> op.matvec(torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)).round(decimals=8)  # 2 [x, 1]
        tensor([2., 4., 2.], dtype=torch.float64)
        >>> model.weight.grad is None  # nothing left behind
        True
    """

    backend = "finite-difference"

    def __init__(
        self,
        module: nn.Module,
        closure: Callable[[nn.Module], Tensor],
        params: Mapping[str, nn.Parameter] | None = None,
        *,
        eps: float | None = None,
        dtype: torch.dtype | None = None,
        mode: Literal["eval", "train"] = "eval",
        seed: int = 0,
        asymmetry_tol: float | None = 1e-2,
        max_shrinks: int = 2,
        vectors: Literal["whole", "local"] = "whole",
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if vectors not in VECTORS:
            raise ValueError(f"vectors must be one of {VECTORS}, got {vectors!r}.")
        if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1):
            raise ValueError(f"eps (the relative step) must be a number in (0, 1), or None for the default; "
                             f"got {eps!r}.")
        if asymmetry_tol is not None and (isinstance(asymmetry_tol, bool) or not isinstance(asymmetry_tol, (int, float))
                                          or not asymmetry_tol > 0):
            raise ValueError(f"asymmetry_tol must be a positive number, or None to switch the kink check off; "
                             f"got {asymmetry_tol!r}.")
        if isinstance(max_shrinks, bool) or not isinstance(max_shrinks, int) or max_shrinks < 0:
            raise ValueError(f"max_shrinks must be an integer >= 0, got {max_shrinks!r}.")
        if params is None:
            params = {k: p for k, p in module.named_parameters() if p.requires_grad}
        if len(params) == 0:
            raise ValueError(f"{type(module).__name__} has no trainable parameters (none with requires_grad=True).")
        own = {id(p) for p in module.parameters()}
        seen: set[int] = set()
        for name, p in params.items():
            if id(p) not in own:
                raise ValueError(f"params[{name!r}] is not a parameter of the module: the finite-difference operator "
                                 "moves the module's own parameters and reads their .grad.")
            if not p.requires_grad:
                raise ValueError(f"params[{name!r}] has requires_grad=False: backward would give it no gradient.")
            if id(p) in seen:
                raise ValueError(f"params[{name!r}] is the same tensor as another entry (tied weights appear once).")
            seen.add(id(p))
        first = next(iter(params.values()))
        self.dtype: torch.dtype = dtype or first.dtype
        if not self.dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating point dtype, got {self.dtype}.")
        self._cast = any(p.dtype != self.dtype for p in module.parameters() if p.is_floating_point())
        if self._cast and any(hasattr(p, "to_local") for p in module.parameters()):
            raise ValueError("dtype differs from the dtype of sharded (DTensor) parameters; the finite-difference "
                             "operator cannot cast a sharded module: leave dtype=None.")
        self.module = module
        self.closure = closure
        self.mode = mode
        self.seed = seed
        self.eps = float(eps) if eps is not None else default_relative_step(self.dtype)
        self.device = first.device
        self.names = list(params)
        self._targets = list(params.values())
        # θ, the unperturbed point, whole (gathered from every process if sharded), in the compute dtype; and the
        # values this process writes its perturbations from (its shards, or θ itself)
        #: the sums and draws of sharded vectors (``vectors="local"``), or None for whole vectors
        self.space: ShardedSpace | None = sharded_space(self._targets, module) if vectors == "local" else None
        if self.space is None and fsdp1_layout(module):
            raise ValueError("FSDP1 (FullyShardedDataParallel) holds each parameter as a slice of its entries: whole "
                             "vectors cannot be written into it. Use vectors='local'.")
        self.vectors = vectors
        gather = _local if self.space is not None else _full
        self.params = {k: gather(p.detach()).to(self.dtype, copy=True) for k, p in params.items()}
        # the ones whose whole direction must be sliced to this process's shard (whole vectors only)
        self._sharded = [hasattr(p, "to_local") and self.space is None for p in self._targets]
        self._base = [_local(p.detach()).to(self.dtype, copy=True) if sharded else self.params[k]
                      for (k, p), sharded in zip(params.items(), self._sharded)]
        self.shapes = [p.shape for p in self.params.values()]
        self.numels = [p.numel() for p in self.params.values()]
        P = sum(self.numels)
        self.shape = (P, P)
        self.asymmetry_tol = None if asymmetry_tol is None else float(asymmetry_tol)
        self.max_shrinks = max_shrinks
        self.num_matvecs = 0
        self.num_gradients = 0
        self.num_shrinks = 0
        self.max_asymmetry = 0.0
        self._warned = False
        self._gradient: Tensor | None = None
        self._loss_value: float | None = None
        self._scales = self._block_scales()
        self._cuda = sorted({p.device for p in module.parameters() if p.device.type == "cuda"}, key=str)
        self._cpu_state = torch.Generator().manual_seed(seed).get_state()
        self._py_state = random.Random(seed).getstate()
        self._np_state = np.random.RandomState(seed % 2**32).get_state() if np is not None else None

    # ------------------------------------------------------------------ flat <-> dict
    def unflatten(self, v: Tensor) -> dict[str, Tensor]:
        """Split a flat vector of length ``P`` into a dict shaped like the parameters."""
        parts = torch.split(v, self.numels)
        return {k: part.view(shape) for k, part, shape in zip(self.names, parts, self.shapes)}

    def flatten(self, tensors: Mapping[str, Tensor | None] | list[Tensor | None]) -> Tensor:
        """Concatenate per-parameter tensors into a flat vector: ``None`` is zero, sparse is densified."""
        values = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
        parts = []
        for t, n in zip(values, self.numels):
            if t is None:
                parts.append(torch.zeros(n, dtype=self.dtype, device=self.device))
                continue
            t = _local(t) if self.space is not None else _full(t)
            if t.layout != torch.strided:  # nn.Embedding(sparse=True) and friends
                t = t.to_dense()
            parts.append(t.reshape(-1).to(self.dtype))
        return torch.cat(parts)

    # ------------------------------------------------------------------ public API
    @property
    def loss(self) -> float:
        """The loss value at ``θ`` (computed with the gradient on first use)."""
        if self._loss_value is None:
            self.gradient()
        assert self._loss_value is not None
        return self._loss_value

    def gradient(self) -> Tensor:
        """The flat gradient ``∇L(θ)``: one ordinary backward at the unperturbed parameters (cached)."""
        if self._gradient is None:
            with self._session():
                self._gradient, loss = self._grad_at(None, 0.0)
            self._loss_value = loss
        return self._gradient

    def step_size(self, v: Tensor) -> float:
        """The ``ε`` a product with ``v`` uses: ``η min_b s_b / ‖v_b‖`` over the tensors ``v`` moves (0 for ``v = 0``).

        No parameter tensor moves by more than ``η`` of its scale ``s_b``.
        """
        v = v.detach().to(torch.float64)
        norms = torch.stack([part.norm() for part in torch.split(v, self.numels)])
        if self.space is not None:  # per parameter, over every process's shard
            norms = self.space.norms(norms)
        moved = norms > 0
        if not bool(moved.any()):
            return 0.0
        return self.eps * float((self._scales[moved] / norms[moved]).min())

    def matvec(self, v: Tensor) -> Tensor:
        """Return the central-difference ``H v`` for a flat vector ``v`` of length ``P`` (two gradients).

        With the kink check on, a product whose asymmetry exceeds ``asymmetry_tol`` is taken again with ``ε/10``
        (at most ``max_shrinks`` times; two more gradients each) and the attempt with the smallest asymmetry is
        returned.
        """
        if v.ndim != 1 or v.shape[0] != self.shape[0]:
            raise ValueError(f"matvec expects a flat vector of length {self.shape[0]}, got shape {tuple(v.shape)}.")
        v = v.to(device=self.device, dtype=self.dtype)
        self.num_matvecs += 1
        eps = self.step_size(v)
        if eps == 0.0:
            return torch.zeros_like(v)
        g0 = self.gradient() if self.asymmetry_tol is not None else None
        attempts: list[tuple[float, Tensor]] = []
        with self._session():
            for attempt in range(1 + (self.max_shrinks if g0 is not None else 0)):
                if attempt:
                    eps /= 10.0
                    self.num_shrinks += 1
                g_plus, _ = self._grad_at(v, eps)
                g_minus, _ = self._grad_at(v, -eps)
                r = 0.0 if g0 is None else _asymmetry(g_plus, g_minus, g0, self.space)
                attempts.append((r, (g_plus - g_minus) / (2.0 * eps)))
                if self.asymmetry_tol is None or r <= self.asymmetry_tol:
                    break
        r, hv = min(attempts, key=lambda a: a[0])
        if r > 0.5:  # jumps dominate every attempt (the ratio saturates near 1): the largest step errs least
            r, hv = attempts[0]
        self._note_asymmetry(r)
        return hv

    def matmat(self, V: Tensor) -> Tensor:
        """Return ``H V`` for a ``(P, m)`` block, one product (two gradients) per column."""
        if V.ndim != 2 or V.shape[0] != self.shape[0]:
            raise ValueError(f"matmat expects a ({self.shape[0]}, m) block, got shape {tuple(V.shape)}.")
        return torch.stack([self.matvec(V[:, j]) for j in range(V.shape[1])], dim=1)

    def release(self) -> None:
        """Nothing to free: no graph or gradient is kept between products (here for the operator interface)."""

    def __enter__(self) -> FiniteDifferenceOperator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return (f"FiniteDifferenceOperator(P={self.shape[0]}, dtype={self.dtype}, mode={self.mode!r}, "
                f"eps={self.eps:.3g})")

    # ------------------------------------------------------------------ internals
    def _block_scales(self) -> Tensor:
        """``s_b = √n_b · max(rms(θ_b), τ)`` per parameter tensor, ``τ`` the typical block rms (see the class)."""
        squares = torch.stack([p.detach().to(torch.float64).pow(2).sum() for p in self.params.values()])
        numels = self.numels
        if self.space is not None:  # the whole parameters': sums over every process's shard
            squares = self.space.sum(squares)
            numels = [piece.numel for piece in self.space.pieces]
        n = torch.tensor(numels, dtype=torch.float64)
        rms = torch.where(n > 0, squares / n.clamp_min(1), 0.0).sqrt()
        # τ: the rms of the block holding the median entry, blocks sorted by rms (zero blocks left out)
        nonzero = rms > 0
        if bool(nonzero.any()):
            r, w = rms[nonzero], n[nonzero]
            order = torch.argsort(r)
            cumulative = torch.cumsum(w[order], 0)
            typical = float(r[order][int(torch.searchsorted(cumulative, cumulative[-1] / 2))])
        else:
            typical = 1.0
        return n.sqrt() * torch.clamp(rms, min=typical)

    @contextlib.contextmanager
    def _session(self) -> Iterator[None]:
        """Everything one product changes, put back on exit: values, ``.grad``, flags, buffers, dtype, RNG."""
        module = self.module
        everything = list(module.parameters())
        grads = [(p, p.grad) for p in everything]
        flags = [(m, m.training) for m in module.modules()]
        buffers = [b for b in module.buffers()]
        data: list[tuple[Tensor, Tensor]] = []
        saved: list[Tensor | None] = []
        try:
            with torch.no_grad():
                if self._cast:
                    # swap storage: the user's tensors are never written; every floating tensor is cast, so that no
                    # op mixes dtypes
                    for t in everything + buffers:
                        if t.is_floating_point() and t.dtype != self.dtype:
                            data.append((t, t.data))
                            t.data = t.data.to(self.dtype)
                else:
                    # bit-exact copy of whatever the targets hold now (skipped where it is θ, the usual case)
                    saved = [None if torch.equal(_local(p), base) else _local(p).clone()
                             for p, base in zip(self._targets, self._base)]
            self._buffers = [(b, b.detach().clone()) for b in buffers]
            with contextlib.ExitStack() as stack:
                stack.enter_context(rng_guard(self._cuda))
                stack.enter_context(torch.enable_grad())
                for dev in {self.device.type, "cpu"}:
                    if dev in ("cpu", "cuda"):
                        stack.enter_context(torch.autocast(device_type=dev, enabled=False))
                yield
        finally:
            with torch.no_grad():
                if self._cast:
                    for t, original in data:
                        t.data = original
                else:
                    for p, base, keep in zip(self._targets, self._base, saved):
                        _local(p).copy_(base if keep is None else keep)
                self._restore_buffers()
            self._buffers = []
            for p, g in grads:
                p.grad = g
            for m, flag in flags:
                m.training = flag

    def _note_asymmetry(self, r: float) -> None:
        self.max_asymmetry = max(self.max_asymmetry, r)
        if self.asymmetry_tol is not None and r > self.asymmetry_tol and not self._warned:
            self._warned = True
            warnings.warn(
                f"FiniteDifferenceOperator: the gradient asymmetry stays above asymmetry_tol={self.asymmetry_tol:g} "
                f"at every step tried, down to ε/{10 ** self.max_shrinks:g} ({r:.2g} at best). Either the loss is not "
                "smooth on the scale of the step, which crosses kinks of the model (ReLU, max-pooling, ...), and "
                "products can be far from the exact Hessian's; or, for an asymmetry near the threshold, the "
                "gradients' rounding is that large (float32 on a smooth model: products then err by at most about the "
                "asymmetry). Use an exact backend, a smooth activation, or dtype=torch.float64 where possible.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _restore_buffers(self) -> None:
        for b, value in self._buffers:
            if not torch.equal(b, value):
                b.copy_(value)

    def _reset_rng(self) -> None:
        torch.set_rng_state(self._cpu_state)
        for d in self._cuda:
            with torch.cuda.device(d):
                torch.cuda.manual_seed(self.seed)
        random.setstate(self._py_state)
        if np is not None:
            np.random.set_state(self._np_state)

    def _grad_at(self, v: Tensor | None, eps: float) -> tuple[Tensor, float]:
        """Flat ``∇L(θ + εv)`` by one ``loss.backward()`` on the module (inside :meth:`_session`), and the loss."""
        parts = self.unflatten(v) if v is not None else {}
        with torch.no_grad():
            for name, p, base, sharded in zip(self.names, self._targets, self._base, self._sharded):
                if name not in parts:
                    _local(p).copy_(base)
                    continue
                part = parts[name]
                if sharded:  # this process's slice of the whole direction, as the parameter is sharded
                    from torch.distributed.tensor import distribute_tensor

                    part = distribute_tensor(part, p.device_mesh, p.placements, src_data_rank=None).to_local()
                torch.add(base, part, alpha=eps, out=_local(p))
        for p in self.module.parameters():
            p.grad = None
        # the mode, for every gradient: the closure may change the flags (a wrapper that restores the module's Python
        # state after each call puts back the training-time ``training`` flags), and the next gradient must not see it
        self.module.train(self.mode == "train")
        self._reset_rng()
        loss = self.closure(self.module)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
            raise ValueError(f"closure must return a scalar tensor, got {shape}.")
        if loss.requires_grad:  # otherwise no parameter is used: the gradient is zero
            loss.backward()
        self.num_gradients += 1
        grad = self.flatten([p.grad for p in self._targets])
        for p in self.module.parameters():
            p.grad = None
        with torch.no_grad():
            self._restore_buffers()
        return grad, float(loss.detach())


@dataclass(frozen=True)
class BackendRace:
    """What :func:`race_backends` measured: seconds per product of each operator and how far apart they are."""

    exact_seconds: float
    first_order_seconds: float
    relative_difference: float  # ‖Ĥv − Hv‖ / ‖Hv‖ on one random unit vector
    tolerance: float

    @property
    def first_order_wins(self) -> bool:
        """The first-order products agree with the exact ones to ``tolerance`` and are faster."""
        return self.relative_difference <= self.tolerance and self.first_order_seconds < self.exact_seconds

    def describe(self) -> str:
        return (f"finite-difference products {1e3 * self.first_order_seconds:.1f} ms, exact "
                f"{1e3 * self.exact_seconds:.1f} ms, relative difference {self.relative_difference:.2g} (at most "
                f"{self.tolerance:.0e} to be used)")


def race_backends(exact: object, first_order: object, *, generator: torch.Generator | None = None,
                  repeats: int = 2, tolerance: float = 1e-3,
                  clock: Callable[[], float] = time.perf_counter) -> BackendRace:
    r"""Time one product of two operators of the same Hessian and compare their values: which one to use.

    Each operator multiplies the same random unit vector ``1 + repeats`` times; the first product is warm-up (the
    exact backend builds its first-order graph, a compiled module runs its first call) and the fastest of the others
    is its cost per product, as inside an estimate where every product after the first reuses what the first built.
    The first-order product is accepted only when ``‖Ĥv − Hv‖ ≤ tolerance ‖Hv‖`` (default ``1e-3``: what smooth
    float32 models give, see :class:`FiniteDifferenceOperator`; a ReLU kink between ``θ ± εv``, or a compiled module
    drawing other dropout masks than the eager one, fails it). Costs ``2 (1 + repeats)`` products, once.

    Args:
        exact: an operator with exact products (``matvec``, ``shape``, ``dtype``, ``device``).
        first_order: a :class:`FiniteDifferenceOperator` of the same loss.
        generator: source of the random vector.
        repeats: timed products of each, after the warm-up one (at least 1).
        tolerance: the largest relative difference at which the first-order products may be used.
        clock: seconds (default ``time.perf_counter``); tests pass a fake one.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats!r}.")
    n = exact.shape[0]  # type: ignore[attr-defined]
    gen_device = generator.device if generator is not None else torch.device("cpu")
    v = torch.randn(n, generator=generator, device=gen_device, dtype=exact.dtype)  # type: ignore[attr-defined]
    v = (v / torch.linalg.vector_norm(v)).to(exact.device)  # type: ignore[attr-defined]

    def timed(op: object) -> tuple[Tensor, float]:
        out, best = op.matvec(v), math.inf  # type: ignore[attr-defined]
        for _ in range(repeats):
            start = clock()
            out = op.matvec(v)  # type: ignore[attr-defined]
            best = min(best, clock() - start)
        return out, best

    hv, t_exact = timed(exact)
    fd, t_first = timed(first_order)
    hv = hv.to(torch.float64)
    diff = torch.linalg.vector_norm(fd.to(device=hv.device, dtype=torch.float64) - hv)
    scale = torch.linalg.vector_norm(hv)
    rel = float(diff / scale) if float(scale) > 0 else (0.0 if float(diff) == 0 else math.inf)
    if not math.isfinite(rel):
        rel = math.inf
    return BackendRace(t_exact, t_first, rel, tolerance)
