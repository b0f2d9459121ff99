"""The model card of a run: `MODEL_CARD.md` (written by `gtransformer report`) and, behind the Hub's metadata
header, the README.md of a Hugging Face export (`gtransformer export`).

    gather(run, checkpoint=None) -> CardFacts   (card_facts.py) what the run's files and its prepared corpus's
                                                say about one checkpoint (the run's newest by default)
    render(facts) -> str                        the Markdown card: the prose of model_card.md (string.Template
                                                parts) filled in with these facts' tables, lists and phrases

The card describes one checkpoint: metrics, measurements and samples after its step are left out. Every number
comes from those files; a fact none of them holds reads "not recorded".
"""

from __future__ import annotations

import dataclasses
import functools
import re
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from gtransformer.config import from_dict
from gtransformer.data.corpus import SPLITS
from gtransformer.files import write_text_atomic
from gtransformer.model.config import ModelConfig
from gtransformer.training.card_facts import CardFacts, Measurement, best_measurement, gather, measurements
from gtransformer.training.run_dir import RunDir

NOT_RECORDED = "not recorded"
GUTENBERG = "https://www.gutenberg.org"


# --- formatting -----------------------------------------------------------------------------------


def count(value: int | None) -> str:
    return NOT_RECORDED if value is None else f"{value:,}"


def plural(n: int, noun: str) -> str:
    return f"{n:,} {noun}" + ("" if n == 1 else "s")


def millions(value: int) -> str:
    return f"{value / 1e6:.1f}M" if value >= 1e6 else f"{value / 1e3:.1f}K"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def decimal(value: float | None, places: int = 4) -> str:
    return NOT_RECORDED if value is None else f"{value:.{places}f}"


def table(rows: list[tuple[str, str]], header: tuple[str, str] = ("", "")) -> list[str]:
    return [f"| {header[0]} | {header[1]} |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]


def fenced(text: str) -> list[str]:
    return ["````text", text, "````"]


def paragraphs(*blocks: str | list[str]) -> str:
    """Blocks (a line, or a list of lines) one after another, a blank line between two."""
    return "\n\n".join(block if isinstance(block, str) else "\n".join(block) for block in blocks)


@functools.cache
def parts() -> dict[str, Template]:
    """The parts of model_card.md by name: the text after each `<!-- part: NAME -->` line, less its blank end."""
    text = resources.files(__package__).joinpath("model_card.md").read_text(encoding="utf-8")
    pieces = re.split(r"^<!-- part: (\w+) -->\n", text, flags=re.MULTILINE)
    return {name: Template(body.rstrip("\n")) for name, body in zip(pieces[1::2], pieces[2::2])}


def part(which: str, /, **values: Any) -> str:
    """Part `which` of model_card.md with its $names filled in ($not_recorded: NOT_RECORDED)."""
    return parts()[which].substitute(values, not_recorded=NOT_RECORDED)


def headline(measurement: Measurement | None) -> str:
    if measurement is None:
        return "not measured"
    return f"{measurement.bits_per_byte:.4f} (step {measurement.step}, {count(measurement.predictions)} tokens)"


# --- sections: what the parts of model_card.md are filled with ------------------------------------------


def _books(facts: CardFacts) -> dict[str, int | None]:
    books = facts.stats.get("books", {})
    splits = facts.stats.get("splits", {})
    kept = books.get("kept")
    if kept is None and splits:
        kept = sum(splits.get(s, {}).get("books", 0) for s in SPLITS)
    return {"raw": books.get("raw"), "kept": kept, "dropped": books.get("dropped")}


def intro(facts: CardFacts) -> dict[str, str]:
    """The intro sentence's phrases: the feed-forward kind, the parameter counts and the books."""
    model = facts.model
    if model.get("n_experts"):
        ffn = f"a Mixture of Experts ({model['n_experts']} experts, {model.get('top_k')} per token)"
    else:
        ffn = "dense SwiGLU feed-forward layers" if model else "a feed-forward of unrecorded kind"
    params = (f"{count(facts.params[0])} parameters, {count(facts.params[1])} of them active per token"
              if facts.params else "a parameter count that was not recorded")
    splits = facts.stats.get("splits", {})
    if all("books" in splits.get(s, {}) for s in SPLITS):
        held_out = splits["val"]["books"] + splits["test"]["books"]
        books = (f"{plural(splits['train']['books'], 'public-domain Portuguese book')} from Project Gutenberg "
                 f"({held_out:,} more held out for evaluation)")
    else:
        books = "public-domain Portuguese books from Project Gutenberg"
    return {"ffn": ffn, "params": params, "books": books}


def summary(facts: CardFacts) -> list[str]:
    train_split = facts.stats.get("splits", {}).get("train", {})
    last = facts.last_train or {}
    rows = [
        ("size", f"{count(facts.params[0])} parameters, {count(facts.params[1])} active per token"
         if facts.params else NOT_RECORDED),
        ("training text", f"{count(train_split.get('tokens'))} tokens ({count(train_split.get('bytes'))} bytes) in "
         + (plural(train_split["books"], "book") if "books" in train_split else f"{NOT_RECORDED} books")
         if train_split else NOT_RECORDED),
        ("trained for", f"{count(last.get('tokens'))} tokens in {count(last.get('step'))} steps" if last else NOT_RECORDED),
        ("val bits per byte", headline(best_measurement(facts, "val"))),
        ("test bits per byte", headline(best_measurement(facts, "test"))),
    ]
    return table(rows, ("", ""))


def data_section(facts: CardFacts) -> str:
    """After the Training data section's first paragraph: the splits, tokenizer, cleaning and book lists."""
    stats, settings = facts.stats, facts.stats.get("settings", {})
    if not stats:
        return part("data_unreachable")
    rows = ["| split | books | UTF-8 bytes | tokens | words |", "|---|---|---|---|---|"]
    splits = stats.get("splits", {})
    for split in SPLITS:
        s = splits.get(split, {})
        rows.append(f"| {split} | {count(s.get('books'))} | {count(s.get('bytes'))} | {count(s.get('tokens'))} "
                    f"| {count(s.get('words'))} |")
    ratios = settings.get("split")
    tokenizer = stats.get("tokenizer", {})
    if tokenizer.get("kind") == "bpe":
        tokenizer_line = (f"Tokenizer: byte-level BPE with {count(tokenizer.get('vocab_size'))} tokens, learnt from "
                          "the train split only.")
    elif tokenizer.get("kind"):
        tokenizer_line = (f"Tokenizer: the {tokenizer.get('encoding')} encoding of tiktoken "
                          f"({count(tokenizer.get('vocab_size'))} tokens).")
    else:
        tokenizer_line = f"Tokenizer: {NOT_RECORDED}."
    min_words, min_portuguese = settings.get("min_words"), settings.get("min_portuguese")
    return part(
        "data", splits="\n".join(rows), tokenizer=tokenizer_line,
        ratios=f" (ratios {' / '.join(str(r) for r in ratios)}, salt \"{settings.get('salt')}\")" if ratios else "",
        min_words=min_words if min_words is not None else "a few",
        portuguese=(f" (under {min_portuguese:.0%} of their words in Portuguese passages)"
                    if min_portuguese is not None else ""),
        books=paragraphs(cleaning(facts), *book_lists(facts)),
    )


def cleaning(facts: CardFacts) -> list[str]:
    """What cleaning kept and dropped: the book and byte counts, then the dropped books and why."""
    books = _books(facts)
    raw_bytes = [b["raw_bytes"] for b in facts.books if "raw_bytes" in b]
    kept_bytes = sum(facts.stats.get("splits", {}).get(s, {}).get("bytes", 0) for s in SPLITS)
    facts_line = f"Books downloaded: {count(books['raw'])}; kept: {count(books['kept'])}; dropped: {count(books['dropped'])}."
    if raw_bytes and len(raw_bytes) == len(facts.books):
        facts_line += (f" The downloaded files held {sum(raw_bytes):,} bytes (in their own encodings); the kept, "
                       f"cleaned text is {kept_bytes:,} UTF-8 bytes.")
    dropped = facts.stats.get("dropped", {})
    if not dropped:
        return [facts_line]
    titles = {str(b.get("id")): b.get("title", "") for b in facts.books}
    return [facts_line, "", "<details><summary>Dropped books and why</summary>", "",
            *(f"- {book_id} {('*' + titles[book_id] + '*: ') if titles.get(book_id) else ''}{reason}"
              for book_id, reason in sorted(dropped.items(), key=lambda pair: int(pair[0]))),
            "", "</details>"]


def book_lists(facts: CardFacts) -> list[list[str]]:
    """One <details> list of books per split (or the line saying they are not known)."""
    kept = [b for b in facts.books if b.get("split") in SPLITS and not b.get("dropped")]
    if not kept:
        return [[part("books_unreachable")]]
    lists = []
    for split in SPLITS:
        members = [b for b in kept if b["split"] == split]
        lines = [f"<details><summary>{split}: {plural(len(members), 'book')}</summary>", ""]
        for book in members:
            author = f", {book['author']}" if book.get("author") else ""
            lines.append(f"- [{book['id']}]({GUTENBERG}/ebooks/{book['id']}) *{book.get('title') or 'untitled'}*{author}")
        lists.append(lines + ["", "</details>"])
    return lists


def architecture_section(facts: CardFacts) -> list[str]:
    if facts.params is None:  # no [model] table, or one this version cannot build
        return [f"The architecture: {NOT_RECORDED}."]
    config = dataclasses.asdict(from_dict(ModelConfig, dict(facts.model), "model"))
    head_dim = config.get("head_dim") or config["d_model"] // config["n_heads"]
    group = config["n_heads"] // config["n_kv_heads"]
    rows = [
        ("parameters", f"{count(facts.params[0])} total ({millions(facts.params[0])}), {count(facts.params[1])} "
         f"active per token ({millions(facts.params[1])})"),
        ("layers", f"{config['n_layers']}, residual width {config['d_model']}, pre-norm RMSNorm"),
        ("attention", f"grouped-query: {config['n_heads']} query heads share {config['n_kv_heads']} key/value heads "
         f"({group} query heads per K/V head), head size {head_dim}, RoPE (θ = {config['rope_theta']:g})"
         + (", RMSNorm on queries and keys" if config.get("qk_norm") else "")),
    ]
    if config["n_experts"]:
        every = "every layer" if config["moe_every"] == 1 else f"every {config['moe_every']}th layer (dense SwiGLU in the others)"
        shared = f" + {config['n_shared_experts']} shared experts" if config.get("n_shared_experts") else ""
        balance = (f"auxiliary balancing loss (coefficient {config['aux_loss_coef']:g})" if config["balance"] == "aux"
                   else "auxiliary-loss-free bias balancing")
        rows += [("feed-forward", f"Mixture of Experts in {every}: {config['n_experts']} SwiGLU experts of hidden "
                  f"size {config['expert_hidden']}, each token routed to {config['top_k']}{shared}"),
                 ("router", f"softmax top-{config['top_k']}, {balance}, z-loss {config['z_loss_coef']:g}")]
    else:
        hidden = config.get("dense_hidden") or max(config["top_k"], 1) * config["expert_hidden"]
        rows.append(("feed-forward", f"dense SwiGLU, hidden size {hidden}"))
    rows += [
        ("context", f"{config['context_length']} tokens"),
        ("vocabulary", f"{config['vocab_size']:,} tokens"),
        ("embeddings", "tied to the output layer" if config.get("tie_embeddings") else "separate from the output layer"),
    ]
    return table(rows, ("", ""))


def muon_share(t: dict[str, Any]) -> str:
    """What Muon trained, before the AdamW part of the optimizer line; '' for an AdamW run."""
    if t.get("optimizer") != "muon":
        return ""
    which = "hidden matrices" if t.get("muon_experts", True) else "hidden matrices but the experts'"
    return (f"Muon (peak learning rate {t.get('muon_lr'):g}, momentum {t.get('muon_momentum')}) for the {which} "
            "and AdamW for the rest (embeddings, head, norms, routers), ")


def training_section(facts: CardFacts) -> list[str]:
    """The checkpoint's step and tokens (meta.json), the last logged train row at or before it (metrics.jsonl)."""
    t, last = facts.train, facts.last_train or {}
    step = facts.step if facts.step is not None else last.get("step")
    tokens = facts.tokens_seen if facts.tokens_seen is not None else last.get("tokens")
    # Train rows are logged every train.log_every steps: say so when the last one is older than the checkpoint.
    at = f" (step {last['step']})" if last and last.get("step") != step else ""
    context, batch, hardware = facts.model.get("context_length"), t.get("batch_size"), facts.hardware
    if hardware:
        processes = hardware.get("processes", 1)
        machine = (f"{processes} × {hardware['device']} ({hardware.get('parallel')})" if processes > 1
                   else hardware["device"])
    else:
        machine = NOT_RECORDED
    precision = hardware.get("precision") or (t.get("precision") if t.get("precision") not in (None, "auto")
                                              else NOT_RECORDED)
    speeds = sorted(facts.tokens_per_s)
    rows = [
        ("steps", count(step)),
        ("tokens seen", count(tokens) + (f" ({last['epoch']:.3f} epochs of the train split{at})"
                                         if "epoch" in last else "")),
        ("batch", f"{batch} windows × {context} tokens = {batch * context:,} tokens per step"
         if batch and context else NOT_RECORDED),
        ("optimizer", f"{muon_share(t)}AdamW, peak learning rate {t['lr']:g}, {t.get('schedule')} schedule with "
         f"{t.get('warmup_steps')} warm-up steps, weight decay {t.get('weight_decay')}, gradient clipping "
         f"{t.get('grad_clip')}" if "lr" in t else NOT_RECORDED),
        ("training time", f"{duration(last['elapsed_s'])}{at} (wall clock from the first step, evaluations "
         "and checkpoints included)" if "elapsed_s" in last else NOT_RECORDED),
        ("hardware", machine),
        ("precision", precision),
        ("median throughput", f"{speeds[len(speeds) // 2]:,.0f} tokens/s" if speeds else NOT_RECORDED),
        ("final train loss", f"{last['loss']:.4f} nats/token{at}" if "loss" in last else NOT_RECORDED),
        ("seed", str(t.get("seed", NOT_RECORDED))),
    ]
    return table(rows, ("", ""))


def evaluation_section(facts: CardFacts) -> str:
    """After the Evaluation section's first paragraph: the measurements (and where the test one is missing)."""
    found = measurements(facts)
    rows = [f"Measurements: {NOT_RECORDED}."]
    if found:
        rows = ["| split | step | predicted tokens | of the split | loss (nats/token) | perplexity | bits per byte "
                "| recorded in |", "|---|---|---|---|---|---|---|---|"]
    for m in found:
        whole = "whole" if m.whole_split else "first part" if m.whole_split is False else NOT_RECORDED
        rows.append(f"| {m.split} | {m.step} | {count(m.predictions)} | {whole} | {m.loss:.4f} "
                    f"| {decimal(m.perplexity, 2)} | {m.bits_per_byte:.4f} | {m.source} |")
    if any(m.split == "test" for m in found):
        return paragraphs(rows)
    return paragraphs(rows, part("test_not_measured"))


def samples_section(facts: CardFacts) -> str:
    if not facts.samples:
        return f"Samples: {NOT_RECORDED} (samples.jsonl is empty)."
    t = facts.train
    return part("samples", step=facts.samples[0]["step"], temperature=t.get("sample_temperature", NOT_RECORDED),
                top_k=t.get("sample_top_k", NOT_RECORDED), top_p=t.get("sample_top_p", NOT_RECORDED),
                repetition_penalty=t.get("sample_repetition_penalty", NOT_RECORDED),
                tokens=t.get("sample_tokens", NOT_RECORDED),
                samples=paragraphs(*(fenced(s["prompt"] + s["text"]) for s in facts.samples)))


def render(facts: CardFacts) -> str:
    context = facts.model.get("context_length")
    return part(
        "card", name=facts.name, **intro(facts), gutenberg=GUTENBERG, summary=paragraphs(summary(facts)),
        data=data_section(facts), architecture=paragraphs(architecture_section(facts)),
        training=paragraphs(training_section(facts)), window=facts.model.get("context_length", NOT_RECORDED),
        evaluation=evaluation_section(facts), samples=samples_section(facts),
        new_tokens=min(60, context // 2) if context else 60, context=count(context), step=count(facts.step),
    ) + "\n"


def write_model_card(run: RunDir) -> Path:
    """MODEL_CARD.md of the run's newest checkpoint, in the run folder."""
    write_text_atomic(run.model_card_path, render(gather(run)))
    return run.model_card_path
