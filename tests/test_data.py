"""Training windows: coverage, seeded order, rank slicing and resumable position."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from gtransformer.data.windows import DataPosition, WindowLoader
from gtransformer.errors import UserError



# --- the loader ----------------------------------------------------------------------------


def loader(tokens, **kwargs) -> WindowLoader:
    args = dict(context=4, global_batch_size=4, micro_batch_size=4, seed=0)
    args.update(kwargs)
    return WindowLoader(tokens, **args)


def test_epoch_covers_every_window_once_in_seeded_order():
    tokens = np.arange(5 * 20, dtype=np.uint16)  # 20 windows of context+1 = 5
    first = loader(tokens)
    seen = []
    for _ in range(first.batches_per_epoch):
        (inputs, targets), = first.next_batch()
        assert torch.equal(inputs[:, 1:], targets[:, :-1])
        seen += (inputs[:, 0] // 5).tolist()
    assert sorted(seen) == list(range(20))
    assert first.position == DataPosition(epoch=1, batch_in_epoch=0) and first.epoch_just_ended
    assert seen != list(range(20)), "windows should come shuffled"
    again = loader(tokens)
    assert [int(x) for _ in range(5) for x in again.next_batch()[0][0][:, 0] // 5] == seen
    other_seed = loader(tokens, seed=1)
    assert [int(x) for _ in range(5) for x in other_seed.next_batch()[0][0][:, 0] // 5] != seen
    second_epoch = [int(x) for _ in range(5) for x in first.next_batch()[0][0][:, 0] // 5]
    assert sorted(second_epoch) == list(range(20)) and second_epoch != seen


def test_position_resumes_the_same_stream():
    tokens = np.arange(5 * 40, dtype=np.uint16)
    straight = loader(tokens)
    expected = [straight.next_batch()[0][0] for _ in range(15)]
    interrupted = loader(tokens)
    for _ in range(7):
        interrupted.next_batch()
    resumed = loader(tokens)
    resumed.load_state_dict(interrupted.state_dict())
    got = [resumed.next_batch()[0][0] for _ in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(expected[7:], got))


def test_ranks_and_accumulation_split_the_same_global_batch():
    tokens = np.arange(5 * 48, dtype=np.uint16)
    one_process = loader(tokens, global_batch_size=8, micro_batch_size=2)
    assert one_process.grad_accum_steps == 4
    ranks = [loader(tokens, global_batch_size=8, micro_batch_size=2, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].grad_accum_steps == 2
    for _ in range(3):
        single = [x for x, _ in one_process.next_batch()]
        per_rank = [[x for x, _ in r.next_batch()] for r in ranks]
        # chunk k = accum_step * world_size + rank
        interleaved = [per_rank[k % 2][k // 2] for k in range(4)]
        assert all(torch.equal(a, b) for a, b in zip(single, interleaved))


def test_bad_batch_sizes_are_user_errors():
    tokens = np.arange(5 * 8, dtype=np.uint16)
    with pytest.raises(UserError, match="multiple"):
        loader(tokens, global_batch_size=6, micro_batch_size=4)
    with pytest.raises(UserError, match="fewer than one batch"):
        loader(tokens, global_batch_size=16, micro_batch_size=16)
