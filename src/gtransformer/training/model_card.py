"""The model card of a run: `MODEL_CARD.md` (written by `gtransformer report`) and, behind the Hub's metadata
header, the README.md of a Hugging Face export (`gtransformer export`).

    gather(run, checkpoint=None) -> CardFacts   reads files only: the checkpoint's meta.json (or the run's
                                                config.toml), metrics.jsonl, evals.jsonl, samples.jsonl, and the
                                                prepared corpus's stats.json and manifest.json (PreparedCorpus)
                                                when the folder the run was trained on is reachable
    render(facts) -> str                        the Markdown card

The card describes one checkpoint (the run's newest by default): metrics, measurements and samples after its
step are left out. Every number comes from those files; a fact none of them holds reads "not recorded".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gtransformer.config import from_dict
from gtransformer.data.corpus import SPLITS, PreparedCorpus
from gtransformer.errors import UserError
from gtransformer.files import write_text_atomic
from gtransformer.model.config import ModelConfig
from gtransformer.model.model import GPT
from gtransformer.training.run_dir import CheckpointDir, RunDir

NOT_RECORDED = "not recorded"
GUTENBERG = "https://www.gutenberg.org"


@dataclass
class CardFacts:
    name: str  # the run folder's name
    step: int | None  # the checkpoint the card describes; None for a run without checkpoints
    tokens_seen: int | None  # training tokens before that checkpoint (meta.json)
    tables: dict[str, dict[str, Any]]  # the [model], [train] and [data] tables the run was trained with
    params: tuple[int, int] | None  # (total, active per token), as GPT counts them
    last_train: dict[str, Any] | None  # metrics.jsonl: the last train row up to `step`
    last_eval: dict[str, Any] | None  # metrics.jsonl: the last eval row up to `step`
    tokens_per_s: list[float] = field(default_factory=list)  # every train row's throughput up to `step`
    evals: list[dict[str, Any]] = field(default_factory=list)  # evals.jsonl: `step` on the run's own corpus
    samples: list[dict[str, Any]] = field(default_factory=list)  # samples.jsonl: the last sampled step up to `step`
    hardware: dict[str, Any] = field(default_factory=dict)  # meta.json's "hardware" ({} before it was recorded)
    stats: dict[str, Any] = field(default_factory=dict)  # stats.json ({} when the corpus is not reachable)
    books: list[dict[str, Any]] = field(default_factory=list)  # manifest.json's book records, id order

    @property
    def model(self) -> dict[str, Any]:
        return self.tables.get("model", {})

    @property
    def train(self) -> dict[str, Any]:
        return self.tables.get("train", {})


# --- gathering ----------------------------------------------------------------------------------


def corpus_of(run: RunDir, checkpoint: CheckpointDir | None) -> PreparedCorpus | None:
    """The prepared corpus the run was trained on, when its folder is reachable from here."""
    path = run.recorded_data(checkpoint)
    return PreparedCorpus(path) if path is not None and path.is_dir() else None


def count_params(model_table: dict[str, Any]) -> tuple[int, int] | None:
    """(total, active per token) of the model a [model] table builds (on the meta device: no memory)."""
    try:
        config = from_dict(ModelConfig, dict(model_table), "model")
    except UserError:
        return None
    with torch.device("meta"):
        model = GPT(config)
    return model.num_params(), model.num_active_params()


def gather(run: RunDir, checkpoint: CheckpointDir | None = None) -> CardFacts:
    """What the files of `run` (and of its prepared corpus) say about `checkpoint` (default: the newest)."""
    checkpoint = checkpoint or run.latest_checkpoint()
    meta = checkpoint.read_meta() if checkpoint is not None else {}
    step = meta.get("step")
    tables = run.trained_tables(checkpoint)

    def up_to_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [r for r in rows if step is None or r.get("step", 0) <= step]

    metrics = up_to_step(run.metrics())
    train = [r for r in metrics if r.get("kind") == "train"]
    evals = [r for r in metrics if r.get("kind") == "eval"]
    samples = up_to_step(run.samples())
    sampled = max((s.get("step", 0) for s in samples), default=None)
    corpus = corpus_of(run, checkpoint)
    measured = []
    if corpus is not None and step is not None:
        here = str(corpus.path.resolve())
        measured = [r for r in run.evals() if r.get("step") == step and r.get("data") == here]
    books = sorted(corpus.manifest().get("books", {}).values(), key=lambda b: b.get("id", 0)) if corpus else []
    return CardFacts(
        # A checkpoint copied out of its run is named by its own folder.
        name=(run.path if run.has_config() or checkpoint is None else checkpoint.path).resolve().name,
        step=step,
        tokens_seen=meta.get("tokens_seen"),
        tables=tables,
        params=count_params(tables["model"]) if "model" in tables else None,
        last_train=train[-1] if train else None,
        last_eval=evals[-1] if evals else None,
        tokens_per_s=[r["tokens_per_s"] for r in train if "tokens_per_s" in r],
        evals=measured,
        samples=[s for s in samples if s.get("step") == sampled],
        hardware=meta.get("hardware", {}),
        stats=corpus.stats() if corpus else {},
        books=books,
    )


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
    return [f"| {header[0]} | {header[1]} |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def fenced(text: str) -> list[str]:
    return ["````text", text, "````", ""]


# --- measurements ---------------------------------------------------------------------------------


@dataclass
class Measurement:
    """One bits-per-byte measurement of a split, from metrics.jsonl (training's val) or evals.jsonl."""

    split: str
    step: int
    predictions: int
    bytes: int | None
    loss: float
    perplexity: float | None
    bits_per_byte: float
    whole_split: bool | None
    source: str


def measurements(facts: CardFacts) -> list[Measurement]:
    found = []
    row = facts.last_eval
    if row is not None and "val_bits_per_byte" in row:
        val_tokens = facts.stats.get("splits", {}).get("val", {}).get("tokens")
        predictions = row.get("val_tokens")
        whole = None if val_tokens is None or predictions is None else predictions == val_tokens - 1
        found.append(Measurement("val", row["step"], predictions, row.get("val_bytes"), row["val_loss"],
                                 row.get("val_perplexity"), row["val_bits_per_byte"], whole,
                                 "metrics.jsonl (training)"))
    for row in facts.evals:
        found.append(Measurement(row["split"], row["step"], row["tokens"], row.get("bytes"), row["loss"],
                                 row.get("perplexity"), row["bits_per_byte"], row.get("whole_split"),
                                 "evals.jsonl (`eval` / `report`)"))
    return found


def best_measurement(facts: CardFacts, split: str) -> Measurement | None:
    """The split's measurement over the most predictions (the later one on a tie)."""
    candidates = [m for m in measurements(facts) if m.split == split]
    return max(reversed(candidates), key=lambda m: m.predictions or 0) if candidates else None


def headline(measurement: Measurement | None) -> str:
    if measurement is None:
        return "not measured"
    return f"{measurement.bits_per_byte:.4f} (step {measurement.step}, {count(measurement.predictions)} tokens)"


# --- sections ---------------------------------------------------------------------------------------


def _books(facts: CardFacts) -> dict[str, int | None]:
    books = facts.stats.get("books", {})
    splits = facts.stats.get("splits", {})
    kept = books.get("kept")
    if kept is None and splits:
        kept = sum(splits.get(s, {}).get("books", 0) for s in SPLITS)
    return {"raw": books.get("raw"), "kept": kept, "dropped": books.get("dropped")}


def intro(facts: CardFacts) -> list[str]:
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
    return [
        f"# {facts.name}",
        "",
        f"A small Portuguese language model: a decoder-only transformer with grouped-query attention and {ffn}, "
        f"{params}, trained from scratch with gtransformer on {books}. "
        "It is a base model: it continues text and was not tuned to follow instructions or to chat.",
        "",
    ]


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
    return ["## Summary", "", *table(rows, ("", ""))]


def data_section(facts: CardFacts) -> list[str]:
    stats, settings = facts.stats, facts.stats.get("settings", {})
    lines = [
        "## Training data",
        "",
        f"Books from [Project Gutenberg]({GUTENBERG}) whose catalog language is Portuguese. They are public domain "
        "in the United States; most were written in the 19th and early 20th centuries and keep the spelling of "
        "their time.",
        "",
    ]
    if not stats:
        return lines + [f"The prepared corpus's stats.json was not reachable when this card was written: "
                        f"the split sizes are {NOT_RECORDED}.", ""]
    rows = ["| split | books | UTF-8 bytes | tokens | words |", "|---|---|---|---|---|"]
    splits = stats.get("splits", {})
    for split in SPLITS:
        s = splits.get(split, {})
        rows.append(f"| {split} | {count(s.get('books'))} | {count(s.get('bytes'))} | {count(s.get('tokens'))} "
                    f"| {count(s.get('words'))} |")
    lines += rows + [""]
    ratios = settings.get("split")
    lines += [
        "Each book goes to one split by a salted hash of its Gutenberg id"
        + (f" (ratios {' / '.join(str(r) for r in ratios)}, salt \"{settings.get('salt')}\")" if ratios else "")
        + ", so val and test are books the model never saw. Token counts include one `<|endoftext|>` before "
        "every book; bytes are the UTF-8 bytes of the cleaned text (what bits per byte divides by).",
        "",
    ]
    tokenizer = stats.get("tokenizer", {})
    if tokenizer.get("kind") == "bpe":
        lines += [f"Tokenizer: byte-level BPE with {count(tokenizer.get('vocab_size'))} tokens, learnt from the "
                  "train split only.", ""]
    elif tokenizer.get("kind"):
        lines += [f"Tokenizer: the {tokenizer.get('encoding')} encoding of tiktoken "
                  f"({count(tokenizer.get('vocab_size'))} tokens).", ""]
    else:
        lines += [f"Tokenizer: {NOT_RECORDED}.", ""]
    lines += cleaning(facts)
    lines += book_lists(facts)
    return lines


def cleaning(facts: CardFacts) -> list[str]:
    settings = facts.stats.get("settings", {})
    min_words = settings.get("min_words")
    min_portuguese = settings.get("min_portuguese")
    lines = [
        "### Cleaning",
        "",
        "`gtransformer prepare` decodes each file (UTF-8, its declared charset, CP1252 or Latin-1), removes "
        "Project Gutenberg's header, licence and footer and the transcribers' credits, joins hard-wrapped lines "
        "into paragraphs, normalises punctuation and drops headings and other fragments under "
        f"{min_words if min_words is not None else 'a few'} words (dialogue lines and short sentences are kept). "
        "It then drops books left too short, books that are not mostly Portuguese"
        + (f" (under {min_portuguese:.0%} of their words in Portuguese passages)" if min_portuguese is not None else "")
        + " and exact duplicates of another book.",
        "",
    ]
    books = _books(facts)
    raw_bytes = [b["raw_bytes"] for b in facts.books if "raw_bytes" in b]
    kept_bytes = sum(facts.stats.get("splits", {}).get(s, {}).get("bytes", 0) for s in SPLITS)
    facts_line = f"Books downloaded: {count(books['raw'])}; kept: {count(books['kept'])}; dropped: {count(books['dropped'])}."
    if raw_bytes and len(raw_bytes) == len(facts.books):
        facts_line += (f" The downloaded files held {sum(raw_bytes):,} bytes (in their own encodings); the kept, "
                       f"cleaned text is {kept_bytes:,} UTF-8 bytes.")
    lines += [facts_line, ""]
    dropped = facts.stats.get("dropped", {})
    if dropped:
        titles = {str(b.get("id")): b.get("title", "") for b in facts.books}
        lines += ["<details><summary>Dropped books and why</summary>", ""]
        lines += [f"- {book_id} {('*' + titles[book_id] + '*: ') if titles.get(book_id) else ''}{reason}"
                  for book_id, reason in sorted(dropped.items(), key=lambda pair: int(pair[0]))]
        lines += ["", "</details>", ""]
    return lines


def book_lists(facts: CardFacts) -> list[str]:
    kept = [b for b in facts.books if b.get("split") in SPLITS and not b.get("dropped")]
    if not kept:
        return [f"Which books are in each split: {NOT_RECORDED} (the prepared corpus's manifest.json was not "
                "reachable).", ""]
    lines = []
    for split in SPLITS:
        members = [b for b in kept if b["split"] == split]
        lines += [f"<details><summary>{split}: {plural(len(members), 'book')}</summary>", ""]
        for book in members:
            author = f", {book['author']}" if book.get("author") else ""
            lines.append(f"- [{book['id']}]({GUTENBERG}/ebooks/{book['id']}) *{book.get('title') or 'untitled'}*{author}")
        lines += ["", "</details>", ""]
    return lines


def architecture_section(facts: CardFacts) -> list[str]:
    if facts.params is None:  # no [model] table, or one this version cannot build
        return ["## Architecture", "", f"The architecture: {NOT_RECORDED}.", ""]
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
    return ["## Architecture", "", *table(rows, ("", ""))]


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
    return ["## Training", "", *table(rows, ("", ""))]


def evaluation_section(facts: CardFacts) -> list[str]:
    lines = [
        "## Evaluation",
        "",
        "Bits per byte: the cross entropy of every predicted token, in bits, summed and divided by the UTF-8 bytes "
        "of the text those tokens encode. Unlike loss per token it does not depend on the tokenizer; lower is "
        f"better. Each split is read in consecutive windows of {facts.model.get('context_length', NOT_RECORDED)} "
        "tokens, each predicted from its own window only; val and test are books left out of training.",
        "",
    ]
    found = measurements(facts)
    if found:
        lines += ["| split | step | predicted tokens | of the split | loss (nats/token) | perplexity | bits per byte "
                  "| recorded in |", "|---|---|---|---|---|---|---|---|"]
    for m in found:
        part = "whole" if m.whole_split else "first part" if m.whole_split is False else NOT_RECORDED
        lines.append(f"| {m.split} | {m.step} | {count(m.predictions)} | {part} | {m.loss:.4f} "
                     f"| {decimal(m.perplexity, 2)} | {m.bits_per_byte:.4f} | {m.source} |")
    lines += [""] if found else [f"Measurements: {NOT_RECORDED}.", ""]
    if not any(m.split == "test" for m in found):
        lines += ["The test split was not measured at this checkpoint: `gtransformer report RUN` measures it when "
                  "the run's prepared corpus is reachable (else `gtransformer eval RUN --split test --data PREPARED`, "
                  "then `gtransformer report RUN`).", ""]
    return lines


def samples_section(facts: CardFacts) -> list[str]:
    lines = ["## Samples", ""]
    if not facts.samples:
        return lines + [f"Samples: {NOT_RECORDED} (samples.jsonl is empty).", ""]
    t = facts.train
    lines += [
        f"Continuations of the run's fixed prompts at step {facts.samples[0]['step']}, one draw each with a fixed "
        f"seed, not picked by hand (temperature {t.get('sample_temperature', NOT_RECORDED)}, top-k "
        f"{t.get('sample_top_k', NOT_RECORDED)}, top-p {t.get('sample_top_p', NOT_RECORDED)}, repetition penalty "
        f"{t.get('sample_repetition_penalty', NOT_RECORDED)}, at most {t.get('sample_tokens', NOT_RECORDED)} new "
        "tokens):",
        "",
    ]
    for sample in facts.samples:
        lines += fenced(sample["prompt"] + sample["text"])
    return lines


def use_and_limits_section() -> list[str]:
    return [
        "## Intended use and limits",
        "",
        "- This is a small base model, trained for study and experiment: how a compact Mixture-of-Experts model "
        "learns a language, and a starting point for fine-tuning. It writes Portuguese that looks like the books it "
        "read; it is not an assistant.",
        "- It was not instruction-tuned or aligned in any way. It does not answer questions, follow instructions or "
        "hold a conversation; prompts are simply continued.",
        "- Do not use it for facts. It has no knowledge beyond the style of its books, and what it writes is often "
        "incoherent or wrong.",
        "- The books are mostly from the 19th and early 20th centuries, in the spelling of their time (\"pae\", "
        "\"egreja\", \"elle\", \"Naquella\", \"idéa\"), so the model writes that spelling rather than today's "
        "Portuguese or Brazilian orthography, and knows nothing of the modern world.",
        "- It may reproduce the prejudices of its period (about women, race, religion, class and colonialism) "
        "without comment. Review its output before showing it to anyone.",
        "- It is small and briefly trained (see Training and Evaluation): expect repetition and drifting text.",
        "",
    ]


def how_to_use_section(facts: CardFacts) -> list[str]:
    context = facts.model.get("context_length")
    new_tokens = min(60, context // 2) if context else 60
    return [
        "## How to use",
        "",
        "With gtransformer, from the run folder (`RUN`):",
        "",
        "```bash",
        f'gtransformer generate RUN --prompt "Era uma vez" --max-new-tokens {new_tokens} --temperature 0.8 --top-k 50',
        "gtransformer serve RUN    # OpenAI-compatible HTTP API and a web page",
        "gtransformer export RUN --out FOLDER    # a Hugging Face transformers folder (Mixtral layout)",
        "```",
        "",
        "With transformers, from an exported folder (`FOLDER`, or the Hub id it was uploaded to):",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'tokenizer = AutoTokenizer.from_pretrained("FOLDER")',
        'model = AutoModelForCausalLM.from_pretrained("FOLDER")',
        'inputs = tokenizer("Era uma vez", return_tensors="pt", return_token_type_ids=False)',
        f"output = model.generate(**inputs, max_new_tokens={new_tokens}, do_sample=True, temperature=0.8, top_k=50)",
        "print(tokenizer.decode(output[0]))",
        "```",
        "",
        f"Prompts and continuations together must fit in {count(context)} tokens (the context length).",
        "",
    ]


def license_section() -> list[str]:
    return [
        "## License",
        "",
        "The weights are released under the MIT license, like the gtransformer code that trained them. The "
        "training texts are public-domain books from Project Gutenberg (public domain in the United States; "
        "check the law where you are). Project Gutenberg's licence text and trademark were removed during "
        "cleaning, and this model is not endorsed by Project Gutenberg.",
        "",
    ]


def render(facts: CardFacts) -> str:
    lines = [
        *intro(facts), *summary(facts), *data_section(facts), *architecture_section(facts),
        *training_section(facts), *evaluation_section(facts), *samples_section(facts),
        *use_and_limits_section(), *how_to_use_section(facts), *license_section(),
        "---",
        "",
        f"Written by `gtransformer report` / `gtransformer export` from the run's files (checkpoint step "
        f"{count(facts.step)}: meta.json, config.toml, metrics.jsonl, evals.jsonl, samples.jsonl) and the prepared "
        f"corpus's stats.json and manifest.json; what they do not hold reads \"{NOT_RECORDED}\".",
        "",
    ]
    return "\n".join(lines)


def write_model_card(run: RunDir) -> Path:
    """MODEL_CARD.md of the run's newest checkpoint, in the run folder."""
    write_text_atomic(run.model_card_path, render(gather(run)))
    return run.model_card_path
