"""ZeRO-1: an optimizer whose state is split over the data-parallel replicas.

Problem: Adam keeps two fp32 moments per parameter, twice the model's own size, and
every data-parallel replica keeps the same copy.  ZeRO stage 1 stores each moment
once across the dp group: all parameters are laid end to end in one flat vector of
``total`` elements, padded to ``dp * S`` with ``S = ceil(total / dp)``, and dp rank r
owns elements ``[r*S, (r+1)*S)``::

    | p0 ........ | p1 ... | p2 ............... | pad |
    |<- rank 0: S ->|<- rank 1: S ->|<- rank 2: S ->|

A step is: reduce-scatter of the flat gradients (rank r receives the sum of block r
over the replicas, divided by dp: the mean gradient of its share), the wrapped
optimizer's step on the share only, and an all-gather of the updated shares into
every replica's parameters.  Communication volume equals one all-reduce (which is a
reduce-scatter plus an all-gather); optimizer state per rank is 1/dp of the total.

The share is handed to the wrapped optimizer as one view per (parameter ∩ share)
piece, each in the parameter's own param group: an element-wise optimizer (SGD,
Adam, AdamW, ...) then does exactly what it does unsharded, including per-parameter
step counts and skipping parameters without a gradient (agreed over the dp group:
a parameter missing a gradient on some replicas counts as zero there).  Optimizers
that look at a whole tensor at once (LAMB's trust ratio, Shampoo) would see pieces and
are not supported.

Use it with the plain module (not :class:`DataParallel`): ``step()`` does the gradient
averaging itself.  ``state_dict()`` holds this rank's share with the layout it belongs
to; ``load_state_dict`` checks that layout before loading.  ``consolidated_state_dict()``
gathers the state the unsharded optimizer would have (torch's format, loadable by it or
by a ShardedOptimizer at any dp through ``load_consolidated_state_dict``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from mpi4py import MPI

from .comm import all_gather, reduce_scatter
from .data_parallel import _reduce_dtype
from .errors import ConfigError
from .topology import Topology
from .watchdog import guarded

__all__ = ["ShardedOptimizer"]

_FORMAT = "mpimp.ShardedOptimizer/1"


def _groups(params: Iterable[Any]) -> list[dict[str, Any]]:
    items = list(params)
    if not items:
        raise ConfigError(f"rank {MPI.COMM_WORLD.Get_rank()}: ShardedOptimizer got an empty parameter list")
    if all(isinstance(g, dict) for g in items):
        return [dict(g, params=list(g["params"])) for g in items]
    if any(isinstance(g, dict) for g in items):
        raise ConfigError("pass either parameters or param-group dicts to ShardedOptimizer, not a mix")
    return [{"params": items}]


class ShardedOptimizer:
    """``ShardedOptimizer(torch.optim.AdamW, model.parameters(), topo, lr=...)``: ZeRO-1 over ``topo.dp_comm``.

    Extra keyword arguments go to the wrapped optimizer; ``reduce_dtype`` (None, fp32,
    bf16, fp16) is the gradients' type on the wire.  The parameters must share one
    dtype and device, and be the same (names, shapes, order) on every dp rank.
    """

    def __init__(self, optimizer_class: type[torch.optim.Optimizer], params: Iterable[Any],
                 topo: Topology, *, reduce_dtype: torch.dtype | str | None = None, **kwargs: Any) -> None:
        self.topo = topo
        self.comm = topo.dp_comm
        self.dp, self.dp_rank = self.comm.Get_size(), self.comm.Get_rank()
        self.wire = _reduce_dtype(reduce_dtype)
        groups = _groups(params)
        self.params: list[torch.Tensor] = []
        seen: set[int] = set()
        for g in groups:
            unique = []
            for p in g["params"]:
                if not isinstance(p, torch.Tensor):
                    raise ConfigError(f"rank {topo.rank}: ShardedOptimizer got a {type(p).__name__}, not a tensor")
                if id(p) in seen:
                    raise ConfigError(f"rank {topo.rank}: a parameter of shape {list(p.shape)} appears twice "
                                      f"in the parameter groups; list each (tied) parameter once")
                seen.add(id(p))
                unique.append(p)
            g["params"] = unique
            self.params.extend(unique)
        self._group_members = [{id(p) for p in g["params"]} for g in groups]
        kinds = {(p.dtype, p.device) for p in self.params}
        if len(kinds) != 1:
            raise ConfigError(f"rank {topo.rank}: ShardedOptimizer needs one dtype and device for all "
                              f"parameters, got {sorted(str(k) for k in kinds)}; use one optimizer per kind")
        self.dtype, self.device = kinds.pop()
        self.offsets, pos = [], 0
        for p in self.params:
            self.offsets.append(pos)
            pos += p.numel()
        self.total = pos
        self.shard = -(-self.total // self.dp)
        lo, hi = self.dp_rank * self.shard, (self.dp_rank + 1) * self.shard
        self.lo = lo
        self.flat = torch.zeros(self.shard, dtype=self.dtype, device=self.device)  # this rank's share
        # pieces: (index of the parameter, start and end within it, the view of self.flat)
        self.pieces: list[tuple[int, int, int, torch.Tensor]] = []
        owner: dict[int, int] = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
        inner_groups: list[dict[str, Any]] = [dict(g, params=[]) for g in groups]
        for i, (p, off) in enumerate(zip(self.params, self.offsets)):
            a, b = max(off, lo), min(off + p.numel(), hi)
            if a < b:
                view = self.flat[a - lo:b - lo]
                self.pieces.append((i, a - off, b - off, view))
                inner_groups[owner[id(p)]]["params"].append(view)
        self.optimizer = optimizer_class(inner_groups, **kwargs)
        self._load_share()

    # -- the share <-> the parameters
    @torch.no_grad()
    def _load_share(self) -> None:
        for i, a, b, view in self.pieces:
            view.copy_(self.params[i].detach().reshape(-1)[a:b])

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's groups (holding this rank's pieces): change ``lr`` here."""
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.detach_().zero_()

    @torch.no_grad()
    def _reduce_scatter_grads(self) -> tuple[torch.Tensor, list[float]]:
        """This rank's share of the mean gradient, and for each parameter how many ranks had one."""
        n = len(self.params)
        wire = self.wire or self.dtype
        grads = torch.zeros(self.dp * self.shard, dtype=wire, device=self.device)
        mask = torch.zeros(n, dtype=wire, device=self.device)
        for i, (p, off) in enumerate(zip(self.params, self.offsets)):
            if p.grad is not None:
                grads[off:off + p.numel()].copy_(p.grad.detach().reshape(-1))
                mask[i] = 1
        # block r = [share r of the gradients | the has-grad counters]: the counters ride along
        blocks = torch.empty(self.dp, self.shard + n, dtype=wire, device=self.device)
        blocks[:, :self.shard].copy_(grads.view(self.dp, self.shard))
        blocks[:, self.shard:].copy_(mask)
        mine = reduce_scatter(blocks, self.comm, op="sum")[0]
        share = mine[:self.shard].to(self.dtype).div_(self.dp)
        return share, mine[self.shard:].tolist()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Average the gradients over dp, step this rank's share, gather the parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        share, counts = self._reduce_scatter_grads()
        self._load_share()  # the parameters may have been changed outside (loaded, edited)
        for i, a, b, view in self.pieces:
            start = self.offsets[i] + a - self.lo
            view.grad = share[start:start + (b - a)] if counts[i] > 0 else None
        self.optimizer.step()
        for _, _, _, view in self.pieces:
            view.grad = None
        full = all_gather(self.flat, self.comm)
        with torch.no_grad():
            for p, off in zip(self.params, self.offsets):
                p.copy_(full[off:off + p.numel()].view(p.shape))
        return loss

    # -- introspection and checkpoints
    def state_bytes(self) -> int:
        """Bytes of optimizer state tensors held by this rank."""
        return sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                   for t in s.values() if isinstance(t, torch.Tensor))

    def _layout(self) -> dict[str, Any]:
        return {"dp": self.dp, "total": self.total, "shard": self.shard,
                "shapes": [list(p.shape) for p in self.params]}

    def state_dict(self) -> dict[str, Any]:
        """This rank's share of the optimizer state, with the layout it belongs to."""
        return {"format": _FORMAT, "dp_rank": self.dp_rank, **self._layout(),
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a share saved by :meth:`state_dict` on the same dp rank of the same layout."""
        if state.get("format") != _FORMAT:
            raise ConfigError(f"rank {self.topo.rank}: not a ShardedOptimizer state (format "
                              f"{state.get('format')!r}, expected {_FORMAT!r})")
        mine = {"dp_rank": self.dp_rank, **self._layout()}
        for key, value in mine.items():
            if state.get(key) != value:
                shown = value if key != "shapes" else f"{len(value)} parameters"
                got = state.get(key) if key != "shapes" else f"{len(state.get(key) or [])} parameters (or other shapes)"
                raise ConfigError(
                    f"rank {self.topo.rank}: the optimizer state was saved with {key} = {got}, this "
                    f"optimizer has {key} = {shown}; load it on the same layout (dp, parameters) it was saved with"
                )
        self.optimizer.load_state_dict(state["optimizer"])

    def _inner_index(self) -> dict[int, int]:
        """id(piece view) -> its index in the wrapped optimizer's state_dict numbering."""
        order = [p for g in self.optimizer.param_groups for p in g["params"]]
        return {id(p): k for k, p in enumerate(order)}

    def consolidated_state_dict(self) -> dict[str, Any]:
        """The state the unsharded optimizer would have, in torch's format, on every dp rank.

        ``state`` is keyed by the parameter's index in the full list (group order), with
        tensors of the parameter's shape: loadable by the unsharded optimizer, or by a
        ShardedOptimizer at another dp (:meth:`load_consolidated_state_dict`).  Collective
        over the dp group.
        """
        inner = self.optimizer.state
        keys = sorted({k for s in inner.values() for k, v in s.items()
                       if isinstance(v, torch.Tensor) and v.dim() > 0})
        flats = {}
        for key in keys:  # element-wise state: gather the shares into full flat vectors
            flat = torch.zeros(self.shard, dtype=self.dtype, device=self.device)
            for i, a, b, view in self.pieces:
                value = inner.get(view, {}).get(key)
                if value is not None:
                    start = self.offsets[i] + a - self.lo
                    flat[start:start + (b - a)] = value.reshape(-1)
            flats[key] = all_gather(flat, self.comm)
        scalars: dict[int, dict[str, Any]] = {}
        for i, _, _, view in self.pieces:
            s = inner.get(view, {})
            small = {k: v for k, v in s.items() if not (isinstance(v, torch.Tensor) and v.dim() > 0)}
            if small:
                scalars.setdefault(i, small)
        merged: dict[int, dict[str, Any]] = {}
        for part in guarded("ShardedOptimizer: allgather of the scalar state", lambda: self.comm.allgather(scalars)):
            for i, small in part.items():
                merged.setdefault(i, small)
        state = {}
        for i, (p, off) in enumerate(zip(self.params, self.offsets)):
            if i not in merged:
                continue  # never stepped (no gradient yet): no state, as unsharded
            entry = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in merged[i].items()}
            for key in keys:
                entry[key] = flats[key][off:off + p.numel()].view(p.shape).clone()
            state[i] = entry
        groups, index = [], 0
        for g in self.optimizer.param_groups:
            count = sum(1 for p in self.params if id(p) in self._group_members[len(groups)])
            groups.append({**{k: v for k, v in g.items() if k != "params"},
                           "params": list(range(index, index + count))})
            index += count
        return {"state": state, "param_groups": groups}

    def load_consolidated_state_dict(self, state: dict[str, Any]) -> None:
        """Load an unsharded optimizer's state (torch format, same parameters and groups): each
        rank keeps its share.  No communication."""
        full_state, groups = state.get("state"), state.get("param_groups")
        if not isinstance(full_state, dict) or not isinstance(groups, list) or len(groups) != len(self.param_groups):
            raise ConfigError(f"rank {self.topo.rank}: not an optimizer state_dict with "
                              f"{len(self.param_groups)} param groups")
        count = sum(len(g["params"]) for g in groups)
        if count != len(self.params):
            raise ConfigError(f"rank {self.topo.rank}: the state holds {count} parameters, this optimizer "
                              f"has {len(self.params)}; load it into the same model")
        index = self._inner_index()
        inner_state = {}
        for i, a, b, view in self.pieces:
            entry = full_state.get(i)
            if entry is None:
                continue
            piece = {}
            for k, v in entry.items():
                if isinstance(v, torch.Tensor) and v.dim() > 0:
                    if v.numel() != self.params[i].numel():
                        raise ConfigError(f"rank {self.topo.rank}: state {k!r} of parameter #{i} has "
                                          f"{v.numel()} elements, the parameter {self.params[i].numel()}")
                    piece[k] = v.reshape(-1)[a:b].clone()
                else:
                    piece[k] = v.clone() if isinstance(v, torch.Tensor) else v
            inner_state[index[id(view)]] = piece
        inner_groups = []
        for g, mine in zip(groups, self.optimizer.param_groups):
            inner_groups.append({**{k: v for k, v in g.items() if k != "params"},
                                 "params": [index[id(p)] for p in mine["params"]]})
        self.optimizer.load_state_dict({"state": inner_state, "param_groups": inner_groups})

    def __repr__(self) -> str:
        return (f"ShardedOptimizer({type(self.optimizer).__name__}, dp rank {self.dp_rank}/{self.dp}, "
                f"{self.shard} of {self.total} elements)")
