"""Serving: the OpenAI-compatible HTTP API and web page of `gtransformer serve`, on top of `inference.engine`."""
