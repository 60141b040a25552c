"""Which ranks take part and in which order: a process group or a DeviceMesh, and the Ulysses and
ring sets of the hybrid layout (SPEC §9).

The sequence order is the shard order: position ``r`` holds the ``r``-th consecutive shard. For a
group that is the group rank. A DeviceMesh (as diffusers' ``ContextParallelConfig`` builds one,
dims ``("ring", "ulysses")``, other dims allowed) orders its context-parallel ranks row-major,
``r = ring_rank * U + ulysses_rank``, which is how diffusers' sharder hands out the shards (over the
flattened ring × ulysses mesh).

Hybrid with Ulysses degree U over W = R·U positions: Ulysses set ``i`` is the U consecutive
positions ``i·U .. i·U + U − 1`` (ring index i, one block of U shards), ring set ``j`` the R
positions ``j, U + j, .., (R − 1)·U + j`` (Ulysses index j); a DeviceMesh's ``"ulysses"`` and
``"ring"`` groups are exactly these sets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import Peers, all_gather_rows

MESH_DIMS = ("ring", "ulysses")


def _device_mesh_class():
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # a torch build without distributed support
        return None
    return DeviceMesh


def _comm_device(group) -> torch.device:
    """Where small control tensors live: NCCL only moves CUDA tensors."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _check_initialised() -> None:
    if not dist.is_available():
        raise RuntimeError("asag_kernels.distributed needs torch.distributed, which this torch build lacks")
    if not dist.is_initialized():
        raise RuntimeError(
            "group: torch.distributed is not initialised; call torch.distributed.init_process_group(...) "
            "on every rank first (backend 'gloo' for CPU tensors, 'nccl' for CUDA tensors)"
        )


@dataclass(frozen=True)
class Topology:
    """This process's place among the ranks of one call.

    Attributes:
        rank, world: this process's shard position and the number of positions.
        group: the process group over all positions (None: the default group), or None with a mesh.
        mesh_degrees: ``(ring, ulysses)`` sizes of the DeviceMesh given, else None.
        mesh_groups: ``(ring group, ulysses group)`` of this process in the mesh, else None.
    """

    rank: int
    world: int
    group: object = None
    mesh_degrees: tuple[int, int] | None = None
    mesh_groups: tuple[object, object] | None = None

    @property
    def device(self) -> torch.device:
        return _comm_device(self.group if self.mesh_groups is None else self.mesh_groups[1])

    def gather_rows(self, row: torch.Tensor) -> torch.Tensor:
        """Every position's 1-D `row`, ``[world, len(row)]`` in shard order: one all_gather over the
        group, or for a mesh one over the Ulysses group and one of those blocks over the ring group."""
        if self.mesh_groups is None:
            return all_gather_rows(row, Peers.whole(self.group, self.rank, self.world))
        ring_peers, ulysses_peers = self._mesh_peers()
        block = all_gather_rows(row, ulysses_peers)  # [U, L]: this Ulysses set, in Ulysses order
        rows = all_gather_rows(block.reshape(-1), ring_peers)  # [R, U·L]: every block, in ring order
        return rows.reshape(self.world, row.numel())

    def _mesh_peers(self) -> tuple[Peers, Peers]:
        (ring, ulysses), (ring_group, ulysses_group) = self.mesh_degrees, self.mesh_groups
        i, j = divmod(self.rank, ulysses)
        return Peers.whole(ring_group, i, ring), Peers.whole(ulysses_group, j, ulysses)

    def peers(self, ulysses_degree: int) -> tuple[Peers, Peers]:
        """(ring peers, Ulysses peers) of this process for Ulysses degree U (a divisor of world)."""
        if self.mesh_groups is not None:
            return self._mesh_peers()
        u = ulysses_degree
        i, j = divmod(self.rank, u)
        ring = Peers(self.group, tuple(s * u + j for s in range(self.world // u)), i, self.world)
        ulysses = Peers(self.group, tuple(range(i * u, i * u + u)), j, self.world)
        return ring, ulysses


def resolve(group) -> Topology:
    """The Topology of `group`: None (the default group), a ProcessGroup, or a DeviceMesh with dims
    named ``"ring"`` and ``"ulysses"``; a clear error otherwise. Raises before any collective, alike
    on every rank that passes the same kind of argument."""
    _check_initialised()
    mesh_cls = _device_mesh_class()
    if mesh_cls is not None and isinstance(group, mesh_cls):
        names = tuple(group.mesh_dim_names or ())
        missing = [d for d in MESH_DIMS if d not in names]
        if missing:
            raise ValueError(
                f"group: a DeviceMesh must have dims named 'ring' and 'ulysses' (as diffusers' ContextParallelConfig "
                f"builds it; size 1 for an unused one), got dims {names or None} (missing {missing})"
            )
        sizes = tuple(group.size(names.index(d)) for d in MESH_DIMS)
        locals_ = tuple(group.get_local_rank(d) for d in MESH_DIMS)
        ring, ulysses = sizes
        return Topology(rank=locals_[0] * ulysses + locals_[1], world=ring * ulysses, mesh_degrees=sizes,
                        mesh_groups=tuple(group.get_group(d) for d in MESH_DIMS))
    # new_group() hands its non-members a sentinel, not a group: they are told so below.
    non_member = group is dist.GroupMember.NON_GROUP_MEMBER
    if group is not None and not non_member and not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"group must be None, a torch.distributed ProcessGroup or a DeviceMesh with dims 'ring' and 'ulysses', "
            f"got {type(group).__name__}"
        )
    rank = -1 if non_member else dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"group: this process (global rank {dist.get_rank()}) is not a member of the group given")
    return Topology(rank=rank, world=dist.get_world_size(group), group=group)
