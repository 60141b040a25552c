"""The collectives the strategies use, each counting the bytes this process sends.

An exchange runs among :class:`Peers`: some ranks of a process group, in shard order. They may be
the whole group (a plain group, or one dim of a DeviceMesh, whose groups hold exactly the peers) or
part of it (the Ulysses and ring sets of the hybrid over one group): an all-to-all then runs over
the whole group with nothing sent to the ranks outside the set, so that no process group has to be
created. Counted: every byte this process hands to another rank (its own share of an all-to-all is
not sent).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

_sent = [0]


def bytes_sent() -> int:
    """Bytes this process has sent through these helpers since the last reset."""
    return _sent[0]


def reset_bytes_sent() -> None:
    _sent[0] = 0


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class Peers:
    """The ranks of one exchange: ``members[s]`` is the group rank of peer s (peers in shard
    order), this process is peer ``index``, ``group_size`` ranks make up ``group``."""

    group: object  # a ProcessGroup, or None for the default group
    members: tuple[int, ...]
    index: int
    group_size: int

    @classmethod
    def whole(cls, group, rank: int, size: int) -> "Peers":
        """Every rank of `group`, in group-rank order."""
        return cls(group, tuple(range(size)), rank, size)

    @property
    def size(self) -> int:
        return len(self.members)


def all_gather_rows(row: torch.Tensor, peers: Peers) -> torch.Tensor:
    """Every peer's 1-D `row`, stacked: [peers.size, len(row)]. `peers` must be a whole group."""
    out = [torch.empty_like(row) for _ in range(peers.group_size)]
    dist.all_gather(out, row.contiguous(), group=peers.group)
    _sent[0] += _nbytes(row) * (peers.group_size - 1)
    return torch.stack(out)


def all_to_all(pieces: list[torch.Tensor], recv_numels: list[int], peers: Peers) -> list[torch.Tensor]:
    """Send the flat ``pieces[s]`` to peer s and return the flat pieces received from each peer
    (``recv_numels[s]`` elements from peer s). Uneven sizes, zeros included (gloo supports uneven
    ``all_to_all_single`` but not an uneven list ``all_to_all``). Every rank of the group takes part
    (each in its own set of peers); ranks outside this process's set get and give nothing."""
    send_sizes, recv_sizes = [0] * peers.group_size, [0] * peers.group_size
    for s, member in enumerate(peers.members):
        send_sizes[member], recv_sizes[member] = pieces[s].numel(), recv_numels[s]
    # Group-rank order, as all_to_all_single splits its buffers.
    order = sorted(range(peers.size), key=lambda s: peers.members[s])
    send = torch.cat([pieces[s].reshape(-1) for s in order])
    recv = send.new_empty(sum(recv_numels))
    dist.all_to_all_single(recv, send, output_split_sizes=recv_sizes, input_split_sizes=send_sizes,
                           group=peers.group)
    _sent[0] += (send.numel() - pieces[peers.index].numel()) * send.element_size()
    got = dict(zip(order, recv.split([recv_numels[s] for s in order])))
    return [got[s] for s in range(peers.size)]


class RingExchange:
    """Post the sends of `tensors` to the next peer and the receives of the previous peer's
    tensors (shapes given) without waiting, so that compute overlaps the transfer."""

    def __init__(self, tensors, recv_shapes, peers: Peers):
        n = peers.size
        nxt, prv = peers.members[(peers.index + 1) % n], peers.members[(peers.index - 1) % n]
        # The sent tensors must outlive the transfer: keep them until wait().
        self._sending = [t.contiguous() for t in tensors]
        self.received = [t.new_empty(shape) for t, shape in zip(tensors, recv_shapes)]
        self._works = []
        for tag, (t, buf) in enumerate(zip(self._sending, self.received)):
            self._works.append(dist.isend(t, group=peers.group, group_dst=nxt, tag=tag))
            self._works.append(dist.irecv(buf, group=peers.group, group_src=prv, tag=tag))
            _sent[0] += _nbytes(t)

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        return self.received
