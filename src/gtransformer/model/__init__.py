"""The model: `config.ModelConfig`, `model.GPT` (GQA attention, blocks, KV cache), `moe` (router and experts)."""
