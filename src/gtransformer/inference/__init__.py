"""Inference: `sampling` (SamplingConfig, SamplingState), `decode` (DecodeOptions, the one decoding step: Decoder),
`decode_model` (a model's matrices laid out for decoding, and their cache), `int8` (weight-only quantisation),
`generate` (the loop), `engine` (continuous batching for the server), `stream` (TextStream), `chat`."""
