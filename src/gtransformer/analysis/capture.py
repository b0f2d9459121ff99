"""What the analyses share to read a model through forward hooks, and to show a sentence's tokens.

    StopForward     raised by a hook once it captured what it needs: the rest of the forward is skipped
    run_until       model(input_ids) without gradients, ended quietly by StopForward
    encode_sentence a text -> token ids that fit the model's context
    visible         a token's text with its whitespace made visible (for tables and axes)

Shapes: B rows, T tokens.
"""

from __future__ import annotations

import torch

from gtransformer.data.tokenizer import Tokenizer
from gtransformer.errors import UserError
from gtransformer.model.model import GPT


class StopForward(Exception):
    """Raised by a hook once everything needed is captured: the rest of the forward (and lm_head) is skipped."""


def run_until(model: GPT, input_ids_BT: torch.Tensor) -> None:
    """model(input_ids_BT) without gradients, ended early when a hook raises `StopForward`."""
    with torch.no_grad():
        try:
            model(input_ids_BT.to(model.embed_tokens.weight.device))
        except StopForward:
            pass


def encode_sentence(model: GPT, tokenizer: Tokenizer, text: str) -> list[int]:
    """`text`'s token ids, checked to fit the model's context."""
    ids = tokenizer.encode(text)
    if not ids:
        raise UserError("the sentence is empty; pass some text to analyse")
    if len(ids) > model.config.context_length:
        raise UserError(f"the sentence has {len(ids)} tokens, more than the model's context_length "
                        f"({model.config.context_length}); shorten it")
    return ids


def visible(token: str) -> str:
    """A token for display: spaces as '·', newlines as '⏎', tabs as '⇥'."""
    return token.replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥")
