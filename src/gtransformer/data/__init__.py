"""The corpus: download -> clean -> prepare (split, tokenizer, shards) -> `PreparedCorpus` -> training windows."""
