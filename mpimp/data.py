"""Training data: the embedded default task, a user's text file, a flat uint16 token file.

Problem: in a model-parallel job no rank should become a data pipe.  Rank 0 only decides
*which* samples make up a step (a few integers, see :mod:`mpimp.coordinator`); every rank
then loads what it needs itself: the first pipeline stage the inputs, the last stage the
targets.  So a dataset here is a pure function from a sample index to tokens, identical
on every rank, with no shared state and no download:

* :class:`ReverseTask` (the default): ``d1 .. dn = dn .. d1`` for n random digits.  The
  loss is taken on the answer tokens only (the prompt is random, so its loss is noise),
  and the task metric is the exact-match accuracy of greedy answers to held-out prompts.
  A 2-block GPT with d_model 64 learns it in a few hundred steps on one CPU core.
* :class:`TokenFile`: a user's text file (byte-level tokens, vocabulary 256) or a
  nanoGPT-style flat ``uint16`` token file (``*.bin``, memory-mapped, never read whole).
  Sample ``i`` is the window ``tokens[i : i + seq_len + 1]``; the first 90% of the
  windows are for training, the last 10% are held out.

A sample index maps to tokens through a counter-based hash (splitmix64), not a stateful
generator, so any rank can load any sample of any step in any order and get the same
tokens: this is what makes the losses independent of the (dp, pp, tp) layout.
:func:`batch_indices` draws a step's global batch from ``(seed, step)`` the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError

__all__ = [
    "IGNORE_INDEX",
    "Dataset",
    "ReverseTask",
    "TokenFile",
    "open_dataset",
    "batch_indices",
    "DataError",
]

IGNORE_INDEX = -100  # target value that takes no part in the loss (torch's default)

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class DataError(ConfigError):
    """The data cannot be used (missing, empty, too short, token ids out of range)."""


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """Counter-based hash: uint64 -> uint64, the same on every platform and rank."""
    with np.errstate(over="ignore"):
        z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _mix(*keys: int | np.ndarray) -> np.ndarray:
    """Hash a tuple of integer keys (scalars or broadcastable arrays) into uint64."""
    h = np.zeros((), dtype=np.uint64)
    for k in keys:
        h = _splitmix64(h ^ (np.asarray(k, dtype=np.int64).astype(np.uint64) & _M64))
    return h


def batch_indices(seed: int, step: int, batch: int, n_samples: int) -> np.ndarray:
    """The ``batch`` sample indices (in ``[0, n_samples)``) of global step ``step``.

    A pure function of its arguments: rank 0 calls it and broadcasts the result, and a
    rerun with the same seed sees the same batches in the same order.
    """
    if n_samples < 1:
        raise DataError(f"the dataset has no training samples (n_samples={n_samples})")
    h = _mix(seed, step, np.arange(batch, dtype=np.int64))
    return (h % np.uint64(n_samples)).astype(np.int64)


@dataclass(frozen=True)
class Dataset:
    """What the trainer needs from a dataset; subclasses implement :meth:`_tokens`.

    ``sample(indices, split)`` returns ``(inputs, targets)`` of shape ``[b, seq_len]``
    (int64); ``inputs`` and ``targets`` can be loaded separately (first / last stage).
    """

    seq_len: int

    @property
    def vocab_size(self) -> int:
        """Smallest vocabulary that holds every token id of this dataset."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        raise NotImplementedError

    def num_samples(self, split: str = "train") -> int:
        raise NotImplementedError

    def _tokens(self, indices: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``[b, seq_len + 1]`` token windows and a ``[b, seq_len]`` bool mask of scored targets."""
        raise NotImplementedError

    def inputs(self, indices: np.ndarray, split: str = "train") -> torch.Tensor:
        tokens, _ = self._tokens(np.asarray(indices, dtype=np.int64), split)
        return torch.from_numpy(np.ascontiguousarray(tokens[:, :-1], dtype=np.int64))

    def targets(self, indices: np.ndarray, split: str = "train") -> torch.Tensor:
        tokens, scored = self._tokens(np.asarray(indices, dtype=np.int64), split)
        y = np.array(tokens[:, 1:], dtype=np.int64)
        y[~scored] = IGNORE_INDEX
        return torch.from_numpy(y)

    def sample(self, indices: np.ndarray, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs(indices, split), self.targets(indices, split)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise :class:`DataError` when a token id does not fit ``vocab_size``."""
        if self.vocab_size > vocab_size:
            raise DataError(
                f"{self.name} holds token id {self.vocab_size - 1} but the vocabulary size is "
                f"{vocab_size}: token ids must be < --vocab-size; pass --vocab-size {self.vocab_size} or more"
            )

    def describe(self) -> str:
        return (f"{self.name}: {self.num_samples('train'):,} training / "
                f"{self.num_samples('eval'):,} held-out samples of {self.seq_len} tokens")


# ----------------------------------------------------------------------------- default task


@dataclass(frozen=True)
class ReverseTask(Dataset):
    """Reverse ``digits`` decimal digits: prompt ``d1 .. dn =``, answer ``dn .. d1``.

    Tokens: 0-9 are the digits, 10 is ``=``; vocabulary 11.  One sequence is
    ``2 * digits + 1`` tokens (``seq_len`` = ``2 * digits``: inputs and targets are the
    sequence shifted by one).  Only the ``digits`` answer targets are scored.

    Held-out prompts are split off by content: a digit string whose hash falls in
    bucket 0 of 10 is never used for training (training samples that would land there
    are redrawn), so the eval accuracy measures prompts the model never saw.
    """

    digits: int = 6
    seed: int = 0

    SEP = 10

    def __post_init__(self) -> None:
        if self.digits < 1:
            raise DataError(f"the reversal task needs at least 1 digit, got {self.digits}")
        if self.seq_len != 2 * self.digits:
            raise DataError(
                f"the reversal task with {self.digits} digits has sequences of {2 * self.digits} "
                f"tokens, but --seq-len is {self.seq_len}; pass --seq-len {2 * self.digits} "
                f"(or --seq-len 2N for N digits)"
            )

    @property
    def vocab_size(self) -> int:
        return 11

    @property
    def name(self) -> str:
        return f"reverse-{self.digits}"

    def num_samples(self, split: str = "train") -> int:
        # the stream is unbounded; report a size that batch_indices can draw from
        return 2**40 if split == "train" else 2**20

    def _held_out(self, prompts: np.ndarray) -> np.ndarray:
        value = np.zeros(prompts.shape[0], dtype=np.int64)
        for k in range(prompts.shape[1]):
            value = value * 10 + prompts[:, k]
        return (_mix(self.seed, 7, value) % np.uint64(10)) == 0

    def prompts(self, indices: np.ndarray, split: str = "train") -> np.ndarray:
        """``[b, digits]`` digit strings of the given samples."""
        idx = np.asarray(indices, dtype=np.int64)
        stream = 0 if split == "train" else 1
        pos = np.arange(self.digits, dtype=np.int64)
        out = np.empty((idx.size, self.digits), dtype=np.int64)
        todo = np.arange(idx.size)
        attempt = 0
        while todo.size:
            h = _mix(self.seed, stream, idx[todo, None], attempt, pos[None, :])
            cand = (h % np.uint64(10)).astype(np.int64)
            keep = self._held_out(cand) == (split != "train")
            out[todo[keep]] = cand[keep]
            todo = todo[~keep]
            attempt += 1
        return out

    def _tokens(self, indices: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
        p = self.prompts(indices, split)
        seq = np.concatenate([p, np.full((p.shape[0], 1), self.SEP, np.int64), p[:, ::-1]], axis=1)
        scored = np.zeros((p.shape[0], self.seq_len), dtype=bool)
        scored[:, self.digits:] = True
        return seq, scored

    def answer_slice(self) -> slice:
        """Positions of the answer among the targets (and the logits)."""
        return slice(self.digits, 2 * self.digits)

    def format(self, tokens: np.ndarray | list[int]) -> str:
        return "".join("=" if int(t) == self.SEP else str(int(t)) for t in tokens)


# ----------------------------------------------------------------------------- files


@dataclass(frozen=True)
class TokenFile(Dataset):
    """A flat token stream on disk: byte-level text, or nanoGPT's uint16 ``.bin``.

    Sample ``i`` of the training split is ``tokens[i : i + seq_len + 1]`` with ``i`` in
    the first 90% of the file; held-out sample ``j`` starts at ``split + j``.  A file too
    short to hold a held-out window evaluates on training windows (said in
    :meth:`describe`).
    """

    path: str = ""
    kind: str = "text"  # "text" (bytes) or "uint16"
    max_token: int = 255

    @staticmethod
    def open(path: str, seq_len: int, kind: str | None = None, check_ids: bool = True) -> TokenFile:
        if kind is None:
            kind = "uint16" if path.endswith(".bin") else "text"
        if not os.path.exists(path):
            raise DataError(f"data file {path!r} does not exist")
        if not os.path.isfile(path):
            raise DataError(f"data path {path!r} is not a regular file")
        size = os.path.getsize(path)
        if size == 0:
            raise DataError(f"data file {path!r} is empty")
        if kind == "uint16" and size % 2:
            raise DataError(f"token file {path!r} has an odd number of bytes ({size}); "
                            f"a nanoGPT .bin file is a flat array of uint16")
        ds = TokenFile(seq_len=seq_len, path=path, kind=kind)
        n = ds._n_tokens()
        if n < seq_len + 1:
            raise DataError(
                f"data file {path!r} holds {n} tokens, shorter than one sequence "
                f"(--seq-len {seq_len} needs {seq_len + 1}); use a longer file or a smaller --seq-len"
            )
        max_token = 255
        if kind == "uint16" and check_ids:
            arr = ds._array()
            max_token = 0
            for start in range(0, n, 1 << 24):
                max_token = max(max_token, int(arr[start:start + (1 << 24)].max()))
        return TokenFile(seq_len=seq_len, path=path, kind=kind, max_token=max_token)

    def _array(self) -> np.ndarray:
        dtype = np.uint16 if self.kind == "uint16" else np.uint8
        return np.memmap(self.path, dtype=dtype, mode="r")

    def _n_tokens(self) -> int:
        return os.path.getsize(self.path) // (2 if self.kind == "uint16" else 1)

    @property
    def vocab_size(self) -> int:
        return self.max_token + 1

    @property
    def name(self) -> str:
        return f"{self.kind} file {self.path}"

    def _split_at(self) -> int:
        n = self._n_tokens()
        split = int(n * 0.9)
        return split if n - split >= self.seq_len + 1 else n

    def num_samples(self, split: str = "train") -> int:
        n, at = self._n_tokens(), self._split_at()
        if split == "train" or at == n:
            return max(1, min(at, n - self.seq_len))
        return n - at - self.seq_len

    def _tokens(self, indices: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
        arr = self._array()
        start = indices % self.num_samples(split)
        if split != "train" and self._split_at() < self._n_tokens():
            start = start + self._split_at()
        windows = np.stack([np.asarray(arr[s:s + self.seq_len + 1], dtype=np.int64) for s in start])
        return windows, np.ones((len(start), self.seq_len), dtype=bool)

    def describe(self) -> str:
        text = super().describe()
        if self._split_at() == self._n_tokens():
            text += " (file too short for a held-out split: evaluating on training windows)"
        return text


def open_dataset(spec: str | None, seq_len: int) -> Dataset:
    """The dataset named by ``--data``: ``None``/``"reverse"`` (default task), or a path.

    A path ending in ``.bin`` is a flat uint16 token file; any other file is byte-level
    text.  ``tokens:PATH`` and ``text:PATH`` force the kind.
    """
    if spec in (None, "", "reverse", "task"):
        if seq_len % 2:
            raise DataError(f"the default task needs an even --seq-len (2 x digits), got {seq_len}")
        return ReverseTask(seq_len=seq_len, digits=seq_len // 2)
    kind = None
    for prefix, k in (("tokens:", "uint16"), ("text:", "text")):
        if spec.startswith(prefix):
            spec, kind = spec[len(prefix):], k
    return TokenFile.open(spec, seq_len, kind)
