"""Inference: `sampling` (SamplingConfig), `generate` (the loop, DecodeOptions), `decode_weights` (one fold
of a model's weights, and its cache), `decode` (eager decoder), `compiled_decode` (torch.compile'd decoder),
`int8` (weight-only quantisation), `stream` (TextStream)."""
