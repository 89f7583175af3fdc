"""Sharded data parallelism (FSDP2) for every module of the package.

``--trainer.strategy fsdp2`` (or ``Trainer(strategy=FSDP2Strategy())``) is Lightning's ``ModelParallelStrategy`` as
plain sharded data parallelism: every process is a data-parallel rank, parameters, gradients and optimizer state
are split across all of them (ZeRO-3), and ``TrainingModule.configure_model`` applies ``fully_shard``:

* each residual block (the modules holding timm's ``drop_path`` slots: ViT / Swin blocks, ResNet bottlenecks)
  is its own FSDP unit, all-gathered for its forward and backward only;
* each network the module calls is a root unit over what remains (embeddings, norms, heads); a module may list
  extra units and methods that run as forwards (MAE's encoder is driven block by block, not through
  ``forward``).

Only the last backward of an optimizer step reduce-scatters (``set_requires_gradient_sync``), so a MaskSub step
costs one reduce-scatter as a DDP step costs one all-reduce. FSDP1 (``--trainer.strategy fsdp``) is refused:
it does not support a backward inside ``training_step`` under manual optimization.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from torch import nn

from masksub_lightning.models import network

__all__ = ["FSDP2Strategy", "load_sharded_checkpoint", "shard_network"]


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy`` with every process in one data-parallel mesh dimension (no tensor parallelism).

    Args:
        save_distributed_checkpoint: each rank writes its shard (a checkpoint folder); False gathers the full state
            on rank 0 into one file (the package's atomic writer, but all weights on one host).
        process_group_backend: ``nccl`` on GPUs (default), ``gloo`` on CPUs.
        **kwargs: further ``ModelParallelStrategy`` arguments (``timeout``).
    """

    strategy_name = "fsdp2"

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            **kwargs,
        )

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" data-parallel size is the node count (it expects tensor parallelism inside
        # a node). Here every process is a data-parallel rank. (A private attribute: it has no public setter.)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


if FSDP2Strategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(
        FSDP2Strategy.strategy_name,
        FSDP2Strategy,
        description="FSDP2 sharded data parallelism over every process (masksub_lightning)",
    )


def is_sharded(strategy: Any) -> bool:
    """Whether the Trainer's strategy expects ``fully_shard`` in ``configure_model``."""
    return isinstance(strategy, ModelParallelStrategy)


def block_units(net: nn.Module) -> list[nn.Module]:
    """The residual blocks of a timm network (owners of its drop-path slots), in module order, no duplicates."""
    seen: dict[int, nn.Module] = {}
    for owner, _, _ in network.drop_path_slots(net):
        seen.setdefault(id(owner), owner)
    return list(seen.values())


def shard_network(
    net: nn.Module,
    mesh: Any,
    extra_units: Sequence[nn.Module] = (),
    forward_methods: Iterable[str] = (),
    mp_policy: Any = None,
    reshard_after_forward: bool | None = None,
) -> None:
    """``fully_shard`` the blocks of ``net`` and ``extra_units`` (bottom-up), then ``net`` itself as the root.

    Args:
        net: the network (a timm model, a decoder, ...).
        mesh: the data-parallel device mesh.
        extra_units: further submodules to shard on their own (called as modules).
        forward_methods: methods of ``net`` that the module calls instead of ``forward``; FSDP all-gathers the
            root's parameters around them as around ``forward``.
        mp_policy: an FSDP2 ``MixedPrecisionPolicy`` or None (parameters in their own dtype).
        reshard_after_forward: True frees the gathered parameters after every forward, the root's too (FSDP2
            keeps a root's until its backward, which a no-grad network such as an EMA teacher never runs).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    if reshard_after_forward is not None:
        kwargs["reshard_after_forward"] = reshard_after_forward
    for unit in [*block_units(net), *extra_units]:
        if any(p.numel() for p in unit.parameters()):
            fully_shard(unit, **kwargs)
    fully_shard(net, **kwargs)
    for name in forward_methods:
        register_fsdp_forward_method(net, name)


def sharded_roots(module: nn.Module) -> list[nn.Module]:
    """The outermost FSDP2 modules under ``module`` (their gradient-sync switch covers their units)."""
    from torch.distributed.fsdp import FSDPModule

    roots: list[nn.Module] = []
    for sub in module.modules():
        if isinstance(sub, FSDPModule) and not any(_is_inside(sub, root) for root in roots):
            roots.append(sub)
    return roots


def _is_inside(sub: nn.Module, root: nn.Module) -> bool:
    return any(m is sub for m in root.modules())


def load_sharded_checkpoint(folder: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint dict from a ``ModelParallelStrategy`` folder (DCP shards + ``meta.pt``), on the CPU.

    The weights and optimizer state come whole (the shards gathered without a process group); ``meta.pt`` (the
    rest: hyperparameters, loops, callbacks) is read with ``weights_only=True``. torch reads the shards' metadata
    with pickle: call this only on folders you wrote.
    """
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = Path(folder)
    checkpoint = torch.load(folder / "meta.pt", map_location="cpu", weights_only=True)
    with (
        tempfile.TemporaryDirectory() as tmp
    ):  # torch's public converter writes a file: read it straight back
        dcp_to_torch_save(folder, Path(tmp) / "gathered.pt")
        state = torch.load(Path(tmp) / "gathered.pt", map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = state.pop("state_dict")
    optimizers = sorted((k for k in state if k.startswith("optimizer_")), key=lambda k: int(k.split("_")[1]))
    checkpoint["optimizer_states"] = [state[k] for k in optimizers]
    return checkpoint
