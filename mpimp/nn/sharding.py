"""Which slice of a full weight each tensor-parallel rank holds, and conversion both ways.

Problem: a sharded model must start from exactly the weights of the single-process
model (so a tp = 2 run can be checked against a tp = 1 run, and a checkpoint moves
between layouts), and it must be exportable back to the single-process state dict.

Initialization: every parallel layer draws the FULL weight from its own
``torch.Generator`` with the same sequence of calls as at tp = 1, then keeps only its
slice (a copy; the full tensor is freed at once).  The shards are therefore exact
slices of the tp = 1 model at any tp, and independent of the layout.  This costs one
full-size temporary per layer and tp times the random-number work, which is nothing
at the sizes mpimp trains on a CPU; for models whose single layer does not fit in one
rank's memory, build on the meta device and initialise each shard from a
counter-based generator keyed by (layer, global index) instead.

Each sharded parameter carries a :class:`ShardSpec` (attribute ``mpimp_shard``): the
partitioned dimension, the *stride* (a fused weight such as qkv = [q; k; v] is split
block by block: each of the ``stride`` equal blocks is split across ranks and rank r
keeps block-piece r of every block) and the unpadded full size (vocabulary padding is
dropped on export and re-added as zeros on import).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from mpi4py import MPI

from ..comm import all_gather
from ..errors import ConfigError, rank_prefix

__all__ = [
    "ShardSpec",
    "shard_tensor",
    "unshard_tensor",
    "mark_sharded",
    "normal_init",
    "full_state_dict",
    "full_grads",
    "load_full_state_dict",
    "padded_size",
]

InitMethod = Callable[[torch.Tensor, torch.Generator], None]


@dataclass(frozen=True)
class ShardSpec:
    """How a parameter is split: along ``dim``, ``stride`` blocks, ``full`` rows before padding."""

    dim: int
    full: int
    stride: int = 1


def padded_size(n: int, parts: int) -> int:
    """Smallest multiple of ``parts`` that is >= n."""
    return -(-n // parts) * parts


def normal_init(std: float = 0.02) -> InitMethod:
    """``init_method`` filling a tensor with N(0, std^2) from the given generator."""

    def init(t: torch.Tensor, generator: torch.Generator) -> None:
        if t.is_meta:  # shapes only (e.g. a pipeline counting parameters); meta normal_ is slow to load
            return
        with torch.no_grad():
            t.normal_(0.0, std, generator=generator)

    return init


def shard_tensor(full: torch.Tensor, comm: MPI.Comm, spec: ShardSpec) -> torch.Tensor:
    """This rank's shard of ``full`` (unpadded or padded along ``spec.dim``), as a new tensor."""
    p, r = comm.Get_size(), comm.Get_rank()
    n = full.shape[spec.dim]
    if n != spec.full and n != padded_size(spec.full, p * spec.stride):
        raise ConfigError(f"{rank_prefix()}tensor of shape {list(full.shape)} does not match a shard "
                          f"spec with {spec.full} rows along dim {spec.dim}")
    target = padded_size(spec.full, p * spec.stride)
    if full.is_meta:  # shapes only; meta cat/normal_ load torch's decompositions (seconds)
        shape = list(full.shape)
        shape[spec.dim] = target // p
        return torch.empty(shape, dtype=full.dtype, device="meta")
    if n < target:
        pad = list(full.shape)
        pad[spec.dim] = target - n
        full = torch.cat([full, full.new_zeros(pad)], dim=spec.dim)
    blocks = full.chunk(spec.stride, dim=spec.dim)
    return torch.cat([b.chunk(p, dim=spec.dim)[r] for b in blocks], dim=spec.dim).clone()


def unshard_tensor(pieces: list[torch.Tensor], spec: ShardSpec) -> torch.Tensor:
    """Inverse of :func:`shard_tensor`: the full (unpadded) tensor from every rank's shard."""
    per_rank = [piece.chunk(spec.stride, dim=spec.dim) for piece in pieces]
    blocks = [torch.cat([pr[b] for pr in per_rank], dim=spec.dim) for b in range(spec.stride)]
    full = torch.cat(blocks, dim=spec.dim)
    return full.narrow(spec.dim, 0, spec.full)


def mark_sharded(param: torch.nn.Parameter, spec: ShardSpec) -> torch.nn.Parameter:
    param.mpimp_shard = spec  # type: ignore[attr-defined]
    return param


def _spec(t: torch.Tensor) -> ShardSpec | None:
    return getattr(t, "mpimp_shard", None)


def _gather(t: torch.Tensor, spec: ShardSpec | None, comm: MPI.Comm) -> torch.Tensor:
    if spec is None:
        return t.detach().clone()
    if comm.Get_size() == 1:
        return unshard_tensor([t.detach()], spec)
    stacked = all_gather(t.detach().unsqueeze(0), comm, dim=0)
    return unshard_tensor(list(stacked.unbind(0)), spec)


def full_state_dict(module: torch.nn.Module, comm: MPI.Comm) -> dict[str, torch.Tensor]:
    """The single-process state dict of a tensor-parallel module (collective over ``comm``).

    Sharded parameters are all-gathered and their padding dropped; replicated ones are
    copied.  Every rank gets the whole dict.
    """
    params = {id(p): p for p in module.parameters()}
    out = {}
    for name, t in module.state_dict(keep_vars=True).items():
        source = params.get(id(t), t)
        out[name] = _gather(source, _spec(source), comm)
    return out


def full_grads(module: torch.nn.Module, comm: MPI.Comm) -> dict[str, torch.Tensor]:
    """Gradients of every parameter as the single-process model would hold them (collective)."""
    out = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[name] = _gather(g, _spec(p), comm)
    return out


def load_full_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor],
                         comm: MPI.Comm) -> None:
    """Load a single-process state dict into a tensor-parallel module (no communication).

    Every rank slices its own shard out of ``state``; missing or unexpected keys raise.
    """
    own = module.state_dict(keep_vars=True)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ConfigError(f"{rank_prefix()}state dict does not match the model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}; was it exported from a model with the same config?")
    with torch.no_grad():
        for name, t in own.items():
            spec = _spec(t)
            src = state[name]
            value = shard_tensor(src, comm, spec) if spec is not None else src
            if value.shape != t.shape:
                raise ConfigError(f"{rank_prefix()}{name}: state has shape {list(src.shape)}, "
                                  f"the model expects {list(t.shape)} on this rank")
            t.copy_(value)
