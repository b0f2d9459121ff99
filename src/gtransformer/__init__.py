"""gtransformer: a GQA + Mixture-of-Experts language model trained on Portuguese books."""

__version__ = "0.1.0"
