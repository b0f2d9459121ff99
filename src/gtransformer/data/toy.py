"""A toy prepared corpus in seconds: Portuguese-like sentences of common words, a small byte-level BPE,
train/val/test shards and stats.json. The test suite and benchmarks/soak_resume.py train tiny models on it."""

from __future__ import annotations

import json
import random
from pathlib import Path

from gtransformer.data.shards import write_shard
from gtransformer.data.tokenizer import Tokenizer

WORDS = (
    "a o de que e do da em um para é com não uma os no se na por mais as dos como mas foi ao ele das "
    "tem à seu sua ou ser quando muito há nos já está eu também só pelo pela até isso ela entre era "
    "depois sem mesmo aos ter seus quem nas me esse eles estão você tinha foram essa num nem suas meu "
    "casa cidade manhã amor coração olhos mulher homem noite dia tempo vida mundo senhor senhora rua"
).split()


def portuguese_like_text(seed: int, sentences: int) -> str:
    """`sentences` random sentences of 4 to 12 of `WORDS`, the same for the same seed."""
    rng = random.Random(seed)
    out = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 12))]
        out.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?", ","]))
    return " ".join(out)


def toy_corpus(folder: Path, vocab_size: int = 384, sentences: int = 600) -> Path:
    """A prepared-corpus folder (train/val/test.bin, tokenizer.json, stats.json) in seconds: four train
    documents, one val and one test, each of `sentences` sentences."""
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
