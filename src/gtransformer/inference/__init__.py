"""Inference: sampling, decode weights folded once, the eager and compiled decoders, text streaming."""
