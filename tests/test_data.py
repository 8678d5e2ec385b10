"""Datasets: the default task, text and token files, deterministic sampling, bad files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mpimp.data import IGNORE_INDEX, DataError, ReverseTask, TokenFile, batch_indices, open_dataset


def test_batch_indices_are_a_pure_function_of_seed_and_step() -> None:
    a = batch_indices(3, 17, 64, 1000)
    assert np.array_equal(a, batch_indices(3, 17, 64, 1000))
    assert not np.array_equal(a, batch_indices(3, 18, 64, 1000))
    assert not np.array_equal(a, batch_indices(4, 17, 64, 1000))
    assert a.dtype == np.int64 and a.min() >= 0 and a.max() < 1000
    # a prefix of a larger batch is not required, but draws must cover the range
    big = batch_indices(0, 0, 20000, 10)
    assert set(big.tolist()) == set(range(10))


def test_reverse_task_tokens_mask_and_answer() -> None:
    ds = open_dataset(None, 12)
    assert isinstance(ds, ReverseTask) and ds.digits == 6 and ds.vocab_size == 11
    idx = np.array([5, 0, 123456789])
    x, y = ds.sample(idx)
    assert x.shape == y.shape == (3, 12) and x.dtype == y.dtype == torch.int64
    p = ds.prompts(idx)
    for b in range(3):
        # reference built by hand: prompt, '=', reversed prompt; targets = inputs shifted by one
        seq = list(p[b]) + [ReverseTask.SEP] + list(p[b][::-1])
        assert x[b].tolist() == seq[:-1]
        expect = [IGNORE_INDEX] * 6 + seq[7:]
        assert y[b].tolist() == expect
    # inputs and targets can be loaded separately and agree with sample()
    assert torch.equal(ds.inputs(idx), x) and torch.equal(ds.targets(idx), y)
    assert ds.format([1, 2, 10, 2, 1]) == "12=21"


def test_reverse_task_held_out_prompts_never_appear_in_training() -> None:
    ds = ReverseTask(seq_len=8, digits=4)  # only 10^4 prompts: collisions would show
    train = {tuple(r) for r in ds.prompts(np.arange(50000), "train")}
    held = {tuple(r) for r in ds.prompts(np.arange(2000), "eval")}
    assert train.isdisjoint(held)
    assert 700 < len(held) <= 1000  # about a tenth of all prompts are held out
    assert len(train) > 8000


def test_reverse_task_rejects_mismatched_seq_len() -> None:
    with pytest.raises(DataError, match="--seq-len 8"):
        ReverseTask(seq_len=9, digits=4)
    with pytest.raises(DataError, match="even --seq-len"):
        open_dataset(None, 7)


def test_text_file_is_byte_level(tmp_path) -> None:
    path = tmp_path / "t.txt"
    text = "hello, world! " * 20
    path.write_text(text)
    ds = open_dataset(str(path), 16)
    assert isinstance(ds, TokenFile) and ds.kind == "text" and ds.vocab_size == 256
    raw = np.frombuffer(text.encode(), dtype=np.uint8)
    x, y = ds.sample(np.array([0, 3]))
    assert x[1].tolist() == raw[3:19].tolist() and y[1].tolist() == raw[4:20].tolist()
    n = len(raw)
    assert ds.num_samples("train") == int(n * 0.9) and ds.num_samples("eval") == n - int(n * 0.9) - 16
    xe, _ = ds.sample(np.array([0]), "eval")
    assert xe[0].tolist() == raw[int(n * 0.9):int(n * 0.9) + 16].tolist()


def test_uint16_token_file_is_memory_mapped(tmp_path) -> None:
    tokens = (np.arange(500) * 7 % 1000).astype(np.uint16)
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    ds = open_dataset(str(path), 8)
    assert ds.kind == "uint16" and ds.vocab_size == int(tokens.max()) + 1
    assert isinstance(ds._array(), np.memmap)
    x, y = ds.sample(np.array([10]))
    assert x[0].tolist() == tokens[10:18].tolist() and y[0].tolist() == tokens[11:19].tolist()
    ds.check_vocab(1000)
    with pytest.raises(DataError, match=f"token id {int(tokens.max())} .* vocabulary size is 512"):
        ds.check_vocab(512)


def test_bad_files_give_clear_errors(tmp_path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        open_dataset(str(tmp_path / "missing.txt"), 8)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match="is empty"):
        open_dataset(str(empty), 8)
    short = tmp_path / "short.txt"
    short.write_bytes(b"abc")
    with pytest.raises(DataError, match="3 tokens, shorter than one sequence"):
        open_dataset(str(short), 8)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"abc")
    with pytest.raises(DataError, match="odd number of bytes"):
        open_dataset(str(odd), 1)
    with pytest.raises(DataError, match="not a regular file"):
        open_dataset(str(tmp_path), 8)
