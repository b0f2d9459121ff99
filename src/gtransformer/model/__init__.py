"""The model: `config.ModelConfig`, `model.GPT` (GQA attention, blocks, KV cache), `moe` (router and
experts), `feed_forward` (dense SwiGLU), `primitives` (the RMSNorm, RoPE and SwiGLU math the decoders share)."""
