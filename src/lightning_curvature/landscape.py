r"""The loss along the sharpest directions: a 1-D cut and a 2-D surface of the loss landscape.

Given the loss as a pure function of a parameter dict (the ``loss_fn`` of a
:class:`~lightning_curvature.operators.HessianOperator`, ``op.loss_fn``) and the point ``θ`` (``op.params``),

- :func:`loss_cut` evaluates ``L(θ + α v)`` on a grid of ``α`` along one direction, e.g. the top Hessian
  eigenvector ``v₁`` (the 1-D plot of PyHessian, Yao et al. 2020);
- :func:`loss_surface` evaluates ``L(θ + α v₁ + β v₂)`` on a grid of ``(α, β)`` (the 2-D picture of Li et al.,
  "Visualizing the Loss Landscape of Neural Nets", NeurIPS 2018, here along the two sharpest directions instead of
  filter-normalised random ones).

Forward passes only, under ``torch.no_grad()``: one per grid point (``n`` for a cut, ``n·m`` for a surface). The
directions are scaled to unit Euclidean norm (``normalize=True``), so ``α`` is a distance in parameter space and,
along a unit eigenvector with eigenvalue ``λ`` at a point where the gradient is orthogonal to it, the second-order
model of the cut is the parabola ``L(θ) + ½ λ α²`` (:meth:`Landscape.quadratic`; with the slope ``s = gᵀv``:
``L(θ) + s α + ½ λ α²``). How far the measured cut leaves that parabola is how far the loss is from quadratic.

The result is a small :class:`Landscape` (grids, losses, and the curvatures/slopes used for the quadratic model) that
serialises to JSON (:meth:`Landscape.to_json`), which is how :func:`lightning_curvature.tensorboard.log_landscape`
stores it for ``lightning-curvature plot --landscape``; :func:`landscape_figure` draws it with matplotlib (imported
only when drawing). This module imports torch only.

Example:
    A quadratic ``L(θ) = ½ θᵀ diag(4, 1) θ`` at its minimum: the cut along the top eigenvector is ``½ · 4 · α²``.

    >>> A = torch.diag(torch.tensor([4.0, 1.0], dtype=torch.float64))
    >>> params = {"w": torch.zeros(2, dtype=torch.float64)}
    >>> cut = loss_cut(lambda p: 0.5 * p["w"] @ A @ p["w"], params, torch.tensor([1.0, 0.0]), [-1.0, 0.0, 0.5])
    >>> cut.losses.tolist()
    [2.0, 0.0, 0.5]
    >>> cut.num_evaluations
    3
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["Landscape", "landscape_figure", "draw_landscape", "loss_cut", "loss_surface", "TENSORBOARD_PLUGIN"]

#: Plugin name of the TensorBoard tensor summaries holding a :class:`Landscape` as JSON (written by
#: :func:`lightning_curvature.tensorboard.log_landscape`, read by ``lightning-curvature plot --landscape``).
TENSORBOARD_PLUGIN = "lightning_curvature_landscape"
_FORMAT_VERSION = 1

LossFn = Callable[[dict[str, Tensor]], Tensor]
Grid = Sequence[float] | Tensor


@dataclass(frozen=True)
class Landscape:
    """The loss on a 1-D (cut) or 2-D (surface) grid around ``θ``.

    Attributes:
        alphas: ``(n,)`` float64 steps along the first direction.
        losses: ``(n,)`` for a cut, ``losses[i] = L(θ + α_i v₁)``; ``(n, m)`` for a surface,
            ``losses[i, j] = L(θ + α_i v₁ + β_j v₂)``; float64.
        loss: ``L(θ)``.
        betas: ``(m,)`` steps along the second direction (surfaces only).
        curvatures: ``vᵀHv`` along each direction when known (the eigenvalues), for :meth:`quadratic`.
        slopes: ``gᵀv`` along each direction when known (default: taken as 0 by :meth:`quadratic`).
        num_evaluations: forward passes spent.
    """

    alphas: Tensor
    losses: Tensor
    loss: float
    betas: Tensor | None = None
    curvatures: tuple[float, ...] = ()
    slopes: tuple[float, ...] = ()
    num_evaluations: int = 0

    @property
    def is_surface(self) -> bool:
        """``True`` for a 2-D surface, ``False`` for a 1-D cut."""
        return self.betas is not None

    def quadratic(self) -> Tensor | None:
        """The second-order model ``L(θ) + Σ_k s_k a_k + ½ Σ_k λ_k a_k²`` on the grid (``None`` without curvatures).

        ``a = (α,)`` for a cut and ``(α, β)`` for a surface; the slopes ``s`` default to 0 and the cross term
        ``α β v₁ᵀHv₂`` is 0 for eigenvectors.
        """
        if not self.curvatures:
            return None
        slopes = self.slopes or (0.0,) * len(self.curvatures)
        grids = [self.alphas] if self.betas is None else list(torch.meshgrid(self.alphas, self.betas, indexing="ij"))
        out = torch.full_like(self.losses, self.loss)
        for a, lam, s in zip(grids, self.curvatures, slopes):
            out = out + s * a + 0.5 * lam * a**2
        return out

    def to_json(self) -> str:
        """Every field as JSON (NaN and infinities written as ``NaN``/``Infinity``, which :meth:`from_json` reads)."""
        return json.dumps(
            {
                "format": _FORMAT_VERSION,
                "alphas": self.alphas.tolist(),
                "betas": None if self.betas is None else self.betas.tolist(),
                "losses": self.losses.tolist(),
                "loss": self.loss,
                "curvatures": list(self.curvatures),
                "slopes": list(self.slopes),
                "num_evaluations": self.num_evaluations,
            }
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Landscape:
        """Read what :meth:`to_json` wrote."""
        data = json.loads(text)
        if data.get("format") != _FORMAT_VERSION:
            raise ValueError(f"unknown landscape format {data.get('format')!r} (expected {_FORMAT_VERSION})")

        def tensor(values: Any) -> Tensor:
            return torch.tensor(values, dtype=torch.float64)

        return cls(
            alphas=tensor(data["alphas"]),
            losses=tensor(data["losses"]),
            loss=float(data["loss"]),
            betas=None if data["betas"] is None else tensor(data["betas"]),
            curvatures=tuple(float(c) for c in data["curvatures"]),
            slopes=tuple(float(s) for s in data["slopes"]),
            num_evaluations=int(data["num_evaluations"]),
        )


# ---------------------------------------------------------------------------------------------------- evaluation
def _grid(values: Grid | None, name: str) -> Tensor:
    if values is None:
        return torch.arange(-10, 11, dtype=torch.float64) / 10  # -1, -0.9, ..., 1 with an exact 0
    grid = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
    if grid.ndim != 1 or grid.numel() == 0 or not bool(torch.isfinite(grid).all()):
        raise ValueError(f"`{name}` must be a non-empty 1-D sequence of finite numbers, got {values!r}.")
    return grid


def _flat_point(
    params: Mapping[str, Tensor] | Tensor, unflatten: Callable[[Tensor], dict[str, Tensor]] | None
) -> tuple[Tensor, Callable[[Tensor], dict[str, Tensor]]]:
    """``θ`` as a flat vector and the map back to a parameter dict."""
    if isinstance(params, Tensor):
        if unflatten is None:
            raise ValueError("a flat parameter vector needs `unflatten` (e.g. HessianOperator.unflatten).")
        return params.detach().reshape(-1), unflatten
    if not params:
        raise ValueError("`params` is empty.")
    names = list(params)
    shapes = [params[k].shape for k in names]
    numels = [params[k].numel() for k in names]
    theta = torch.cat([params[k].detach().reshape(-1) for k in names])

    def split(v: Tensor) -> dict[str, Tensor]:
        return {k: part.view(shape) for k, part, shape in zip(names, torch.split(v, numels), shapes)}

    return theta, unflatten or split


def _direction(v: Tensor | Mapping[str, Tensor], theta: Tensor, normalize: bool, name: str) -> Tensor:
    if isinstance(v, Mapping):
        v = torch.cat([t.detach().reshape(-1) for t in v.values()])
    v = v.detach().reshape(-1).to(device=theta.device, dtype=theta.dtype)
    if v.numel() != theta.numel():
        raise ValueError(f"`{name}` has {v.numel()} entries; the parameters have {theta.numel()}.")
    norm = float(torch.linalg.vector_norm(v))
    if not math.isfinite(norm) or (normalize and norm == 0.0):
        raise ValueError(f"`{name}` must be a finite, non-zero vector (norm {norm}).")
    return v / norm if normalize else v


def _evaluator(loss_fn: LossFn, unflatten: Callable[[Tensor], dict[str, Tensor]]) -> Callable[[Tensor], float]:
    def evaluate(point: Tensor) -> float:
        value = loss_fn(unflatten(point))
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(f"`loss_fn` must return a scalar tensor, got {value!r}.")
        return float(value)

    return evaluate


def _known(values: Sequence[float | None], n: int) -> tuple[float, ...]:
    """``values`` as floats when all ``n`` are given, else ``()``."""
    if len(values) != n or any(v is None for v in values):
        return ()
    return tuple(float(v) for v in values)  # type: ignore[arg-type]


def loss_cut(
    loss_fn: LossFn,
    params: Mapping[str, Tensor] | Tensor,
    direction: Tensor | Mapping[str, Tensor],
    alphas: Grid | None = None,
    *,
    unflatten: Callable[[Tensor], dict[str, Tensor]] | None = None,
    curvature: float | None = None,
    slope: float | None = None,
    normalize: bool = True,
) -> Landscape:
    """The loss along one direction: ``L(θ + α v)`` for every ``α`` in ``alphas``.

    Args:
        loss_fn: the loss as a pure function of a parameter dict (e.g. ``op.loss_fn`` of a ``HessianOperator``);
            it must be a fixed function (same batch, no fresh dropout masks) for the cut to mean anything.
        params: ``θ`` as a parameter dict (e.g. ``op.params``; flattened in dict order), or as a flat vector with
            ``unflatten``.
        direction: ``v``, flat (length ``P``, in the order of ``params``) or a dict shaped like ``params``; e.g. a
            column of ``lanczos(...).eigenvectors``.
        alphas: the steps (default ``linspace(-1, 1, 21)``); with ``normalize=True`` they are Euclidean distances
            from ``θ``.
        unflatten: maps a flat vector to the dict ``loss_fn`` takes (``op.unflatten``); needed for a flat ``params``.
        curvature: ``vᵀHv`` (the eigenvalue, for a unit eigenvector), kept for the quadratic model.
        slope: ``gᵀv``, kept for the quadratic model.
        normalize: scale ``v`` to unit norm (default); ``False`` uses it as given.

    Returns:
        A 1-D :class:`Landscape`. ``θ`` and the tensors of ``params`` are not modified.

    Raises:
        ValueError: empty or non-finite grid, a direction of the wrong length or zero norm, or a non-scalar loss.
    """
    grid = _grid(alphas, "alphas")
    theta, unflat = _flat_point(params, unflatten)
    v = _direction(direction, theta, normalize, "direction")
    evaluate = _evaluator(loss_fn, unflat)
    with torch.no_grad():
        loss0 = evaluate(theta)
        losses = [loss0 if float(a) == 0.0 else evaluate(theta + float(a) * v) for a in grid]
    return Landscape(
        alphas=grid,
        losses=torch.tensor(losses, dtype=torch.float64),
        loss=loss0,
        curvatures=_known([curvature], 1),
        slopes=_known([slope], 1),
        num_evaluations=1 + sum(float(a) != 0.0 for a in grid),
    )


def loss_surface(
    loss_fn: LossFn,
    params: Mapping[str, Tensor] | Tensor,
    directions: Sequence[Tensor | Mapping[str, Tensor]] | Tensor,
    alphas: Grid | None = None,
    betas: Grid | None = None,
    *,
    unflatten: Callable[[Tensor], dict[str, Tensor]] | None = None,
    curvatures: Sequence[float | None] = (),
    slopes: Sequence[float | None] = (),
    normalize: bool = True,
) -> Landscape:
    """The loss on a plane: ``L(θ + α_i v₁ + β_j v₂)`` for every ``α_i`` in ``alphas`` and ``β_j`` in ``betas``.

    Args:
        loss_fn: as for :func:`loss_cut`.
        params: as for :func:`loss_cut`.
        directions: ``(v₁, v₂)``, or a ``(P, 2)`` matrix (e.g. ``lanczos(op, k=2).eigenvectors``); each scaled
            to unit norm with ``normalize=True``. They are not orthogonalised (eigenvectors already are).
        alphas: steps along ``v₁`` (default ``linspace(-1, 1, 21)``).
        betas: steps along ``v₂`` (default: ``alphas``).
        unflatten: as for :func:`loss_cut`.
        curvatures: ``(λ₁, λ₂)`` for the quadratic model (e.g. the two eigenvalues).
        slopes: ``(gᵀv₁, gᵀv₂)`` for the quadratic model.
        normalize: as for :func:`loss_cut`.

    Returns:
        A 2-D :class:`Landscape` with ``losses[i, j]`` at ``(alphas[i], betas[j])``.
    """
    if isinstance(directions, Tensor):
        if directions.ndim != 2 or directions.shape[1] != 2:
            raise ValueError(f"`directions` as a matrix must be (P, 2), got shape {tuple(directions.shape)}.")
        directions = [directions[:, 0], directions[:, 1]]
    if len(directions) != 2:
        raise ValueError(f"`directions` must be two vectors, got {len(directions)}.")
    grid_a = _grid(alphas, "alphas")
    grid_b = grid_a.clone() if betas is None else _grid(betas, "betas")
    theta, unflat = _flat_point(params, unflatten)
    v1 = _direction(directions[0], theta, normalize, "directions[0]")
    v2 = _direction(directions[1], theta, normalize, "directions[1]")
    evaluate = _evaluator(loss_fn, unflat)
    losses = torch.empty(len(grid_a), len(grid_b), dtype=torch.float64)
    count = 1
    with torch.no_grad():
        loss0 = evaluate(theta)
        for i, a in enumerate(grid_a.tolist()):
            for j, b in enumerate(grid_b.tolist()):
                if a == 0.0 and b == 0.0:
                    losses[i, j] = loss0
                else:
                    losses[i, j] = evaluate(theta + a * v1 + b * v2)
                    count += 1
    return Landscape(
        alphas=grid_a,
        losses=losses,
        loss=loss0,
        betas=grid_b,
        curvatures=_known(list(curvatures), 2),
        slopes=_known(list(slopes), 2),
        num_evaluations=count,
    )


# ---------------------------------------------------------------------------------------------------- drawing
def draw_landscape(ax: Any, landscape: Landscape, *, label: str | None = None, color: Any = None) -> Any:
    """Draw ``landscape`` on the matplotlib axes ``ax``.

    A cut: the measured loss against ``α`` (solid, dots) and, when curvatures are known, the quadratic model
    (dashed, same colour). A surface: filled contours of the loss over ``(α, β)`` (20 levels), the quadratic
    model's contours at every fourth level as thin dashed white lines, ``θ`` marked with a red cross.

    Returns:
        The artist to hang a colour bar on (surfaces) or the loss line (cuts).
    """
    quad = landscape.quadratic()
    alphas = landscape.alphas.numpy()
    if landscape.betas is None:
        (line,) = ax.plot(alphas, landscape.losses.numpy(), marker=".", color=color, label=label)
        if quad is not None:
            ax.plot(alphas, quad.numpy(), linestyle="--", linewidth=1, color=line.get_color())
        ax.set_xlabel(r"$\alpha$ (step along $v_1$)")
        ax.set_ylabel("loss")
        return line
    betas = landscape.betas.numpy()
    losses = landscape.losses.numpy().T  # rows: beta (y), columns: alpha (x)
    filled = ax.contourf(alphas, betas, losses, levels=20, cmap="viridis")
    if quad is not None:
        ax.contour(alphas, betas, quad.numpy().T, levels=filled.levels[::4], colors="white", linewidths=0.7,
                   linestyles="--")
    ax.plot([0.0], [0.0], marker="x", color="red", markersize=8, linestyle="none")
    ax.set_xlabel(r"$\alpha$ (step along $v_1$)")
    ax.set_ylabel(r"$\beta$ (step along $v_2$)")
    return filled


def landscape_figure(landscape: Landscape, title: str | None = None, *, dpi: int = 100) -> Any:
    """A matplotlib ``Figure`` (no pyplot; an Agg canvas attached) of ``landscape``, legend below the axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(5.6, 4.4), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    artist = draw_landscape(ax, landscape, color="C0")
    handles = []
    if landscape.is_surface:
        fig.colorbar(artist, ax=ax, label="loss")
    else:
        handles.append(Line2D([], [], color="C0", marker=".", label="loss"))
        ax.grid(True, alpha=0.3)
    if landscape.curvatures:
        lams = ", ".join(f"{c:.3g}" for c in landscape.curvatures)
        color = "0.3" if landscape.is_surface else "C0"
        handles.append(Line2D([], [], color=color, linestyle="--", label=f"quadratic model, λ = {lams}"))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize="small")
    default = "loss on the plane of the top two eigenvectors" if landscape.is_surface else (
        "loss along the top eigenvector")
    ax.set_title(title or default, fontsize="medium")
    return fig
