"""The one shape exchange of a distributed call: every rank's shard lengths and arguments in one
small all_gather, then the same cross-rank checks on every rank (so all raise together).

Each rank contributes a float64 row (integers below 2**53 are exact in it):

    [error, q.dim, lead dims (padded to MAX_LEAD_DIMS with -1), Nq, Nk, D, Dv, dtype, device type,
     num_iters, cost, scale is None, scale, epsilon, backend, strategy, ulysses_degree (0: None),
     return_potentials]

Rows are gathered in shard order (:meth:`.topology.Topology.gather_rows`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


MAX_LEAD_DIMS = 8
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Row layout: name -> (start, length).
_FIELDS = (
    ("error", 1), ("ndim", 1), ("lead", MAX_LEAD_DIMS), ("nq", 1), ("nk", 1), ("d", 1), ("dv", 1),
    ("dtype", 1), ("device", 1), ("num_iters", 1), ("cost", 1), ("scale_none", 1), ("scale", 1),
    ("epsilon", 1), ("backend", 1), ("strategy", 1), ("ulysses_degree", 1), ("return_potentials", 1),
)
_SLICES = {}
_pos = 0
for _name, _len in _FIELDS:
    _SLICES[_name] = slice(_pos, _pos + _len)
    _pos += _len
ROW_LEN = _pos

# What a disagreement between ranks is called in the error message.
_LABELS = {
    "ndim": "number of dims of q", "lead": "leading dims", "d": "head dim D", "dv": "value dim Dv",
    "dtype": "dtype", "device": "device type", "num_iters": "num_iters", "cost": "cost",
    "scale_none": "scale (None or not)", "scale": "scale", "epsilon": "epsilon", "backend": "backend",
    "strategy": "strategy", "ulysses_degree": "ulysses_degree", "return_potentials": "return_potentials",
}


@dataclass(frozen=True)
class Layout:
    """What every rank holds: shard lengths in shard order and the common shapes."""

    rank: int
    world: int
    lead: tuple[int, ...]
    nq: tuple[int, ...]
    nk: tuple[int, ...]
    d: int
    dv: int

    @property
    def heads(self) -> int:
        """Independent problems: the product of the leading dims."""
        n = 1
        for s in self.lead:
            n *= s
        return n

    @staticmethod
    def offsets(lengths) -> list[int]:
        out, pos = [], 0
        for n in lengths:
            out.append(pos)
            pos += n
        return out


def encode(q, k, v, *, error: bool, codes: dict[str, float], device) -> torch.Tensor:
    row = torch.full((ROW_LEN,), -1.0, dtype=torch.float64)
    row[_SLICES["error"]] = float(error)
    if not error:
        lead = q.shape[:-2]
        row[_SLICES["ndim"]] = q.dim()
        row[_SLICES["lead"].start : _SLICES["lead"].start + len(lead)] = torch.tensor(lead, dtype=torch.float64)
        for name, value in (("nq", q.shape[-2]), ("nk", k.shape[-2]), ("d", q.shape[-1]), ("dv", v.shape[-1]),
                            ("dtype", _DTYPES.index(q.dtype)), ("device", 0 if q.device.type == "cpu" else 1)):
            row[_SLICES[name]] = value
        for name, value in codes.items():
            row[_SLICES[name]] = value
    return row.to(device)


def exchange(q, k, v, *, local_error: BaseException | None, codes, topology) -> Layout:
    """Gather every rank's row; raise on every rank if any rank's inputs were bad or the ranks
    disagree; else the Layout."""
    rank, world = topology.rank, topology.world
    rows = topology.gather_rows(encode(q, k, v, error=local_error is not None, codes=codes, device=topology.device))
    rows = rows.cpu()
    bad = [r for r in range(world) if rows[r, 0] != 0]
    if local_error is not None:
        raise local_error
    if bad:
        raise ValueError(f"rank(s) {bad} of the group rejected their inputs (see the error raised there)")
    for name, label in _LABELS.items():
        col = rows[:, _SLICES[name]]
        if not (col == col[0]).all():
            per_rank = ", ".join(f"rank {r}: {_describe(name, col[r])}" for r in range(world))
            raise ValueError(f"every rank must pass the same {label}; got {per_rank}")
    ndim = int(rows[0, _SLICES["ndim"]])
    lead = tuple(int(x) for x in rows[0, _SLICES["lead"]][: ndim - 2])
    nq = tuple(int(x) for x in rows[:, _SLICES["nq"]].flatten())
    nk = tuple(int(x) for x in rows[:, _SLICES["nk"]].flatten())
    if sum(nk) == 0:
        raise ValueError(f"k must hold at least one key over all ranks (total Nk >= 1), got Nk={list(nk)} per rank")
    return Layout(rank, world, lead, nq, nk, int(rows[0, _SLICES["d"]]), int(rows[0, _SLICES["dv"]]))


def _describe(name: str, values: torch.Tensor):
    if name == "lead":
        return tuple(int(x) for x in values if x >= 0)
    if name == "dtype":
        return str(_DTYPES[int(values[0])])
    value = values[0].item()
    return int(value) if value == int(value) else value
