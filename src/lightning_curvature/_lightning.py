"""From a Lightning run to an operator: which parameters, which loss, which batches, which strategies.

The pieces of :class:`~lightning_curvature.CurvatureMonitor` that know Lightning's objects (``LightningModule``,
``Trainer``, strategies, dataloaders) but not the Lightning hook order; the callback itself only decides when.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.combined_loader import CombinedLoader
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from .isolation import ModuleState, rng_guard
from .operators import DistributedOperator, GGNOperator, HessianOperator, module_loss_fn, private_copy
from .options import MonitorOptions

LOSS_HOOK = "curvature_loss"
OUTPUTS_HOOK = "curvature_outputs"
SUPPORTED_STRATEGIES = (
    "single device (CPU or one GPU), DDP (strategy='ddp', 'ddp_spawn', 'ddp_notebook'), FSDP2 through "
    "ModelParallelStrategy with tensor_parallel_size=1 (fully_shard in configure_model), and FSDP1 through "
    "FSDPStrategy with use_orig_params=True (its default) and sharding_strategy FULL_SHARD or SHARD_GRAD_OP "
    "(both sharded: finite-difference products)"
)


# ---------------------------------------------------------------------------------------------------- processes
def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if world_size() > 1 else 0


def any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` on any process (one tiny all-reduce; every process must call it)."""
    return max_over_ranks([float(flag)], device)[0] > 0


def max_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """The element-wise maximum of ``values`` over every process (one all-reduce; every process must call it)."""
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.tolist()


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` runs ``torch.compile``d code.

    A compiled submodule (dynamo's ``OptimizedModule``), or a LightningModule compiled as a whole and handed to
    ``Trainer.fit`` (Lightning keeps its ``_compiler_ctx``).
    """
    if getattr(module, "_compiler_ctx", None) is not None:
        return True
    return any(type(m).__name__ == "OptimizedModule" for m in module.modules())


def is_sharded(strategy: Any) -> bool:
    """Whether the strategy shards the parameters across processes (FSDP2 or FSDP1)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return type(strategy).__name__ == "ModelParallelStrategy" or isinstance(strategy, FSDPStrategy)


def check_strategy(strategy: Any, backend: str = "auto") -> None:
    """Refuse what cannot work: tensor parallelism, DeepSpeed, FSDP1 without ``use_orig_params``, exact backends.

    Under FSDP2 (``fully_shard``; Lightning's ``ModelParallelStrategy`` with ``tensor_parallel_size=1``) the
    parameters are sharded DTensors, and under FSDP1 (``FSDPStrategy``) slices of flat parameters: ``autograd.grad``
    cannot differentiate with respect to them, ``loss.backward()`` can, so the products are finite differences of the
    strategy's own gradients.
    """
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, SingleDeviceStrategy

    name = type(strategy).__name__
    deepspeed = any(c.__name__ == "DeepSpeedStrategy" for c in type(strategy).__mro__)  # a DDPStrategy subclass
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) and not deepspeed:
        return
    if isinstance(strategy, FSDPStrategy):
        kind = "FSDP1"
        if not getattr(strategy, "kwargs", {}).get("use_orig_params", True):
            raise ValueError(
                "CurvatureMonitor needs FSDPStrategy(use_orig_params=True) (its default): without it the parameters "
                f"are flat parameters spanning several of the model's. Supported: {SUPPORTED_STRATEGIES}."
            )
    elif name == "ModelParallelStrategy":
        kind = "FSDP2"
        tp = getattr(strategy, "_tensor_parallel_size", 1)
        if tp not in (1, "auto"):
            raise ValueError(
                f"CurvatureMonitor does not support tensor parallelism (ModelParallelStrategy with "
                f"tensor_parallel_size={tp}). Supported: {SUPPORTED_STRATEGIES}."
            )
    else:
        raise ValueError(f"CurvatureMonitor does not support {name}. Supported: {SUPPORTED_STRATEGIES}.")
    if backend not in ("auto", "finite-difference"):
        raise ValueError(
            f"CurvatureMonitor(backend={backend!r}) cannot differentiate {kind}'s sharded parameters twice: use "
            "backend='finite-difference' (or 'auto', which picks it)."
        )


# ---------------------------------------------------------------------------------------------------- parameters
def differentiated_parameters(
    pl_module: pl.LightningModule, optimizers: list[torch.optim.Optimizer], which: str
) -> dict[str, torch.nn.Parameter]:
    """The parameters the Hessian is taken over, by name, in ``named_parameters`` order.

    ``which="optimizer"``: those with ``requires_grad=True`` that some optimizer's param groups hold (what training
    moves; all with ``requires_grad`` when the run has no optimizer). ``"trainable"``: all with ``requires_grad``.
    """
    trainable = {n: p for n, p in pl_module.named_parameters() if p.requires_grad}
    if which == "trainable" or not optimizers:
        return trainable
    held = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    return {n: p for n, p in trainable.items() if id(p) in held}


# ---------------------------------------------------------------------------------------------------- the loss
def extract_loss(value: Any) -> Tensor:
    if isinstance(value, Mapping):
        if "loss" not in value:
            raise ValueError(f"training_step returned a dict without 'loss' (keys: {sorted(value)}).")
        value = value["loss"]
    if value is None:
        raise ValueError("training_step returned None (a skipped batch): there is no loss to differentiate.")
    if not isinstance(value, Tensor):
        raise TypeError(f"The training loss must be a tensor, got {type(value).__name__}.")
    return value


def batch_weights(batches: list[tuple[Any, int]]) -> tuple[list[int], list[float]]:
    """Batch sizes and their shares of the total: several batches are averaged weighted by batch size."""
    sizes = [_batch_size(b) for b, _ in batches]
    total = float(sum(sizes))
    return sizes, [n / total for n in sizes]


def _batch_size(batch: Any) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return int(extract_batch_size(batch))
        except Exception:
            return 1


def loss_closure(
    pl_module: pl.LightningModule, batches: list[tuple[Any, int]], dtype: torch.dtype,
    weights: list[float] | None = None,
) -> Any:
    """``closure(module) -> loss`` on private copies of the batches.

    The module's ``curvature_loss(batch)`` if it has one, else ``training_step`` called as Lightning calls it (the
    batch index passed whenever the method takes a second positional argument or ``*args``); several batches are
    weighted by ``weights`` (default: by batch size, summing to one).
    """
    hook = getattr(pl_module, LOSS_HOOK, None)
    if weights is None:
        _, weights = batch_weights(batches)
    takes_idx = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)

    def closure(module: pl.LightningModule) -> Tensor:
        loss: Tensor | None = None
        for (batch, idx), w in zip(batches, weights):
            batch = private_copy(batch, dtype)
            if callable(hook):
                value = module.curvature_loss(batch)  # type: ignore[operator]
            else:
                value = module.training_step(batch, idx) if takes_idx else module.training_step(batch)
            value = extract_loss(value)
            term = value if len(batches) == 1 and w == 1.0 else w * value
            loss = term if loss is None else loss + term
        assert loss is not None
        return loss

    return closure


def _mse(output: Tensor, target: Tensor) -> Tensor:
    return ((output - target) ** 2).mean()


def build_operator(
    pl_module: pl.LightningModule, batches: list[tuple[Any, int]], params: dict[str, Tensor],
    options: MonitorOptions, seed: int, weights: list[float] | None = None, backend: str | None = None,
    sharded: bool = False,
    vectors: str = "whole",
) -> Any:
    """This process's curvature operator (Hessian or GGN) of the training loss on ``batches``.

    Under DDP it is all-reduced, and a failure to build it on one process reaches every process as a non-finite value
    (never as a hang in a collective). ``weights``: of each batch's loss (default: by batch size, summing to one).
    ``backend``: overrides ``options.backend``. ``sharded`` (FSDP2): finite differences of the strategy's own
    gradients, which its backward already averages over processes (no all-reduce here); ``vectors``: ``"whole"`` or
    ``"local"`` (each process holds its shards of every vector; see :class:`FiniteDifferenceOperator`).
    """
    dtype = options.torch_dtype
    if sharded:
        # the module's dtype (casting sharded parameters is not supported), the strategy's own reduction
        dtype = next(iter(params.values())).dtype
        return _GlobalLoss(_local_operator(pl_module, batches, params, options, dtype, seed, weights,
                                           "finite-difference", vectors))
    try:
        op = _local_operator(pl_module, batches, params, options, dtype, seed, weights, backend or options.backend)
    except Exception as err:
        if world_size() == 1:
            raise
        op = _FailedOperator(err, params, dtype)
    if world_size() > 1:
        op = DistributedOperator(op)
    return op


def _local_operator(
    pl_module: pl.LightningModule, batches: list[tuple[Any, int]], params: dict[str, Tensor],
    options: MonitorOptions, dtype: torch.dtype, seed: int, weights: list[float] | None, backend: str,
    vectors: str = "whole",
) -> Any:
    mode = options.mode
    if backend == "finite-difference":
        from .finite_difference import FiniteDifferenceOperator

        closure = loss_closure(pl_module, batches, dtype, weights)
        python_state = ModuleState(pl_module)  # self.hidden & co. restored after every gradient: one fixed function

        def restoring(module: pl.LightningModule) -> Tensor:
            with python_state.restoring():
                return closure(module)

        return FiniteDifferenceOperator(pl_module, restoring, params, dtype=dtype, mode=mode,  # type: ignore
                                        seed=seed, vectors=vectors)  # type: ignore[arg-type]
    if options.curvature == "hessian":
        closure = loss_closure(pl_module, batches, dtype, weights)
        loss_fn, theta = module_loss_fn(pl_module, closure, params=params, dtype=dtype, mode=mode,  # type: ignore
                                        seed=seed)
        return HessianOperator(loss_fn, theta, backend=backend, dtype=dtype)  # type: ignore[arg-type]
    # GGN: outputs of all batches concatenated; the loss is their batch-size weighted mean
    hook = getattr(pl_module, OUTPUTS_HOOK)
    with torch.no_grad():
        targets = [private_copy(hook(private_copy(b, dtype))[1], dtype) for b, _ in batches]
    sizes, size_weights = batch_weights(batches)
    weights = size_weights if weights is None else weights

    def outputs(module: pl.LightningModule) -> Tensor:
        return torch.cat([hook(private_copy(b, dtype))[0].reshape(n, -1) for (b, _), n in zip(batches, sizes)])

    output_fn, theta = module_loss_fn(pl_module, outputs, params=params, dtype=dtype, mode=mode,  # type: ignore
                                      seed=seed)
    criterion = torch.nn.functional.cross_entropy if options.ggn_loss == "cross_entropy" else _mse

    def loss_of_output(f: Tensor) -> Tensor:
        parts = torch.split(f, sizes)
        return sum(w * criterion(p.reshape(t.shape) if options.ggn_loss == "mse" else p, t)
                   for w, p, t in zip(weights, parts, targets))  # type: ignore[return-value]

    return GGNOperator(output_fn, loss_of_output, theta, dtype=dtype)


class _GlobalLoss:
    """A sharded (FSDP2) operator with the loss of the whole batch.

    The strategy's backward already averages products and gradient over processes; only the loss value is this
    process's own, so it is all-reduced here (the mean over processes).
    """

    def __init__(self, op: Any) -> None:
        self.op = op
        self.shape, self.dtype, self.device = op.shape, op.dtype, op.device
        self._loss: float | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.op, name)

    @property
    def loss(self) -> float:
        if self._loss is None:
            local = torch.tensor([self.op.loss], dtype=torch.float64, device=self.device)
            torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.SUM)
            self._loss = float(local) / world_size()
        return self._loss

    def matvec(self, v: Tensor) -> Tensor:
        return self.op.matvec(v)

    def matmat(self, V: Tensor) -> Tensor:
        return self.op.matmat(V)

    def gradient(self) -> Tensor:
        return self.op.gradient()


class _FailedOperator:
    """Stands in for an operator this process could not build: NaN everywhere, so the collectives still line up."""

    def __init__(self, error: Exception, params: dict[str, Tensor], dtype: torch.dtype) -> None:
        self.local_error = error
        first = next(iter(params.values()))
        self.names = list(params)
        self.shapes = [p.shape for p in params.values()]
        self.numels = [p.numel() for p in params.values()]
        self.params = {k: p.detach().to(dtype) for k, p in params.items()}
        P = sum(self.numels)
        self.shape, self.dtype, self.device = (P, P), dtype, first.device
        self.num_matvecs = 0

    @property
    def loss(self) -> float:
        return float("nan")

    def gradient(self) -> Tensor:
        return torch.full((self.shape[0],), float("nan"), dtype=self.dtype, device=self.device)

    def matvec(self, v: Tensor) -> Tensor:
        self.num_matvecs += 1
        return torch.full_like(v, float("nan"))

    def matmat(self, V: Tensor) -> Tensor:
        self.num_matvecs += V.shape[1]
        return torch.full_like(V, float("nan"))

    def flatten(self, tensors: Any) -> Tensor:
        values = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
        return torch.cat([t.reshape(-1).to(self.dtype) for t in values])

    def release(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------- fixed batches
def draw_fixed_batches(
    trainer: pl.Trainer, pl_module: pl.LightningModule, num_batches: int, seed: int
) -> list[tuple[Any, int]]:
    """Draw ``num_batches`` batches once, with a generator of their own (so a resumed run draws the same).

    Raises:
        ValueError: the train dataloader has fewer than ``num_batches`` batches.
    """
    loader: Any = trainer.train_dataloader
    if isinstance(loader, CombinedLoader):
        loader = loader.flattened[0]
    generator = torch.Generator().manual_seed(seed)
    raw: list[Any] = []
    with rng_guard([pl_module.device]):
        torch.manual_seed(seed)
        if (
            isinstance(loader, DataLoader)
            and not isinstance(loader.dataset, IterableDataset)
            and loader.batch_size is not None
            and hasattr(loader.dataset, "__len__")
        ):
            n = len(loader.dataset)  # type: ignore[arg-type]
            world, me = world_size(), rank()
            # every process draws the same permutation and takes its own shard, as a DistributedSampler would
            order = torch.randperm(n, generator=generator)[: loader.batch_size * num_batches * world]
            order = order[me::world]
            for chunk in order.split(loader.batch_size):
                raw.append(loader.collate_fn([loader.dataset[int(i)] for i in chunk]))
        else:
            if isinstance(loader, DataLoader):
                loader = DataLoader(loader.dataset, batch_size=loader.batch_size, collate_fn=loader.collate_fn)
            for batch in loader:
                raw.append(batch)
                if len(raw) == num_batches:
                    break
    if len(raw) < num_batches:
        raise ValueError(
            f"CurvatureMonitor(data='fixed', num_batches={num_batches}): the train dataloader yields only {len(raw)} "
            f"batch(es) per process; lower `num_batches` to at most {len(raw)}."
        )
    out = []
    for i, batch in enumerate(raw):
        batch = trainer.precision_plugin.convert_input(batch)
        batch = pl_module._on_before_batch_transfer(batch, dataloader_idx=0)
        batch = trainer.strategy.batch_to_device(batch, dataloader_idx=0)
        out.append((batch, i))
    return out
