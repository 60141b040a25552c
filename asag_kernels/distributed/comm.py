"""The collectives the strategies use, each counting the bytes this process sends.

Ranks are group ranks throughout; the functions translate them for torch.distributed. Counted:
every byte this process hands to another rank (its own share of an all-to-all is not sent).
"""

from __future__ import annotations

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


def all_gather_rows(row: torch.Tensor, world: int, group) -> torch.Tensor:
    """Every rank's 1-D `row`, stacked: [world, len(row)]."""
    out = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(out, row.contiguous(), group=group)
    _sent[0] += _nbytes(row) * (world - 1)
    return torch.stack(out)


def all_to_all(pieces: list[torch.Tensor], recv_numels: list[int], rank: int, group) -> list[torch.Tensor]:
    """Send the flat ``pieces[s]`` to rank s and return the flat pieces received from each rank
    (``recv_numels[s]`` elements from rank s). Uneven sizes, zeros included (gloo supports uneven
    ``all_to_all_single`` but not an uneven list ``all_to_all``)."""
    send = torch.cat([p.reshape(-1) for p in pieces])
    recv = send.new_empty(sum(recv_numels))
    dist.all_to_all_single(
        recv, send, output_split_sizes=list(recv_numels), input_split_sizes=[p.numel() for p in pieces], group=group
    )
    _sent[0] += (send.numel() - pieces[rank].numel()) * send.element_size()
    return list(recv.split(list(recv_numels)))


class RingExchange:
    """Post the sends of `tensors` to the next rank and the receives of the previous rank's
    tensors (shapes given) without waiting, so that compute overlaps the transfer."""

    def __init__(self, tensors, recv_shapes, rank: int, world: int, group):
        nxt, prv = (rank + 1) % world, (rank - 1) % world
        # The sent tensors must outlive the transfer: keep them until wait().
        self._sending = [t.contiguous() for t in tensors]
        self.received = [t.new_empty(shape) for t, shape in zip(tensors, recv_shapes)]
        self._works = []
        for tag, (t, buf) in enumerate(zip(self._sending, self.received)):
            self._works.append(dist.isend(t, group=group, group_dst=nxt, tag=tag))
            self._works.append(dist.irecv(buf, group=group, group_src=prv, tag=tag))
            _sent[0] += _nbytes(t)

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        return self.received
