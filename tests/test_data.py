"""Training windows: coverage, seeded order, rank slicing and resumable position.

Also home of `make_corpus` / `tiny_tables`, the small prepared corpus and model the
other training tests (train, evaluate, checkpoint, report, distributed) share.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from gtransformer.data import DataPosition, WindowLoader
from gtransformer.errors import UserError

WORDS = (
    "a o de que e do da em um para é com não uma os no se na por mais as dos como mas foi ao ele das "
    "tem à seu sua ou ser quando muito há nos já está eu também só pelo pela até isso ela entre era "
    "depois sem mesmo aos ter seus quem nas me esse eles estão você tinha foram essa num nem suas meu "
    "casa cidade manhã amor coração olhos mulher homem noite dia tempo vida mundo senhor senhora rua"
).split()


def portuguese_like_text(seed: int, sentences: int) -> str:
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        out.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?", ","]))
    return " ".join(out)


def make_corpus(folder: Path, vocab_size: int = 384, sentences: int = 600) -> Path:
    """A prepared-corpus folder (train/val/test.bin, tokenizer.json, stats.json) in seconds."""
    from gtransformer.shards import write_shard
    from gtransformer.tokenizer import Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    documents = {split: [portuguese_like_text(offset + i, sentences) for i in range(n)]
                 for split, n, offset in (("train", 4, 0), ("val", 1, 100), ("test", 1, 200))}
    tokenizer = Tokenizer.train_bpe(documents["train"], vocab_size=vocab_size)
    tokenizer.save(folder / "tokenizer.json")
    stats = {"splits": {}}
    for split, docs in documents.items():
        tokens: list[int] = []
        for doc in docs:
            tokens += tokenizer.encode(doc) + [tokenizer.eot_id]
        write_shard(folder / f"{split}.bin", tokens, vocab_size=tokenizer.vocab_size)
        stats["splits"][split] = {"books": len(docs), "bytes": sum(len(d.encode()) for d in docs), "tokens": len(tokens)}
    (folder / "stats.json").write_text(json.dumps(stats), encoding="utf-8")
    return folder


def tiny_tables(data: Path, **train) -> dict:
    """[model]/[train]/[data] tables for a model that trains a step in milliseconds."""
    return {
        "model": {"vocab_size": 384, "context_length": 32, "d_model": 32, "n_layers": 2, "n_heads": 4,
                  "n_kv_heads": 2, "n_experts": 4, "top_k": 2, "expert_hidden": 32},
        "train": {"batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "eval_every": 0,
                  "eval_tokens": 256, "checkpoint_every": 0, "sample_prompts": [], "tensorboard": False, **train},
        "data": {"path": str(data)},
    }




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
