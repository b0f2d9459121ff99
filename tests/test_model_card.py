"""The model card reads true: every number on it is the one in metrics.jsonl, evals.jsonl and stats.json.

A fixture mirror is downloaded, prepared, trained on for a few steps and reported on; the card is then
read back as text and compared with those files, value by value, in the card's own formatting.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from gtransformer.cli import main
from gtransformer.data.corpus import PreparedCorpus
from gtransformer.data.download import download
from gtransformer.data.prepare import prepare
from gtransformer.interop.hf import hub_metadata
from gtransformer.model.config import ModelConfig
from gtransformer.model.model import GPT
from gtransformer.training.checkpoint import load_for_inference
from gtransformer.training.evaluate import evaluate_split, token_byte_lengths
from gtransformer.training.model_card import write_model_card
from gtransformer.training.run_dir import RunDir
from gtransformer.training.trainer import train

pytestmark = [pytest.mark.usefixtures("one_thread")]


@pytest.fixture
def trained(small_mirror, tmp_path, tiny_tables) -> tuple[RunDir, Path]:
    """(run, prepared corpus): prepare over the fixture mirror (one book dropped), 4 steps, checkpoints at 2 and 4."""
    raw, data = tmp_path / "raw", tmp_path / "prepared"
    download(str(small_mirror), raw, progress=False)
    stats = prepare(raw, data, vocab_size=300, workers=1, ratios=(0.5, 0.25, 0.25))
    tables = tiny_tables(data, max_steps=4, checkpoint_every=2, sample_prompts=["Era uma vez", "O amor é"],
                         sample_tokens=6)
    tables["model"]["vocab_size"] = stats["tokenizer"]["vocab_size"]  # samples draw from the model's vocabulary
    train(tables, tmp_path / "run", progress_bar=False)
    return RunDir(tmp_path / "run"), data


def row_of(card: str, label: str) -> str:
    """The value cell of the first two-column table row named `label`."""
    match = re.search(rf"^\| {re.escape(label)} \| (.*) \|$", card, re.MULTILINE)
    assert match, f"no row {label!r}"
    return match.group(1)


def details(card: str, split: str) -> list[int]:
    """The Gutenberg ids listed under a split's <details> block."""
    block = re.search(rf"<summary>{split}: .*?</summary>(.*?)</details>", card, re.DOTALL)
    assert block, f"no book list for {split}"
    return [int(i) for i in re.findall(r"^- \[(\d+)\]", block.group(1), re.MULTILINE)]


def front_matter(readme: str) -> dict:
    """The Hub's YAML header, parsed for the subset it uses: `key: value`, `key:` + `- item` lists, comments."""
    assert readme.startswith("---\n")
    header, _, _ = readme[4:].partition("\n---\n")
    parsed: dict = {}
    key = None
    for line in header.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith("- "):
            parsed[key].append(line[2:].strip())
            continue
        key, _, value = line.partition(":")
        parsed[key] = value.strip() if value.strip() else []
    return parsed


def test_card_numbers_are_those_of_metrics_evals_and_stats(trained):
    run, data = trained
    assert main(["report", str(run.path), "--device", "cpu"]) == 0
    card = run.model_card_path.read_text(encoding="utf-8")
    stats = json.loads((data / "stats.json").read_text(encoding="utf-8"))
    manifest = json.loads((data / "manifest.json").read_text(encoding="utf-8"))["books"]
    metrics = run.metrics()
    last_train = [r for r in metrics if r["kind"] == "train"][-1]
    last_eval = [r for r in metrics if r["kind"] == "eval"][-1]

    # Data: stats.json, split by split, and the books of each split from manifest.json.
    for split in ("train", "val", "test"):
        s = stats["splits"][split]
        assert f"| {split} | {s['books']:,} | {s['bytes']:,} | {s['tokens']:,} | {s['words']:,} |" in card
        members = sorted(int(k) for k, b in manifest.items() if b["split"] == split and not b["dropped"])
        assert details(card, split) == members and len(members) == s["books"]
    books = stats["books"]
    assert f"Books downloaded: {books['raw']}; kept: {books['kept']}; dropped: {books['dropped']}." in card
    assert f"- 107 *Libro Español*: {stats['dropped']['107']}" in card
    raw_bytes = sum(b["raw_bytes"] for b in manifest.values())
    kept_bytes = sum(s["bytes"] for s in stats["splits"].values())
    assert f"held {raw_bytes:,} bytes (in their own encodings); the kept, cleaned text is {kept_bytes:,} UTF-8" in card
    assert f"byte-level BPE with {stats['tokenizer']['vocab_size']:,} tokens" in card
    assert "(ratios 0.5 / 0.25 / 0.25, salt \"gtransformer\")" in card

    # Architecture: the counts GPT gives for the run's [model] table.
    model = GPT(ModelConfig(**run.read_config()["model"]))
    total, active = model.num_params(), model.num_active_params()
    assert row_of(card, "size") == f"{total:,} parameters, {active:,} active per token"
    assert row_of(card, "parameters").startswith(f"{total:,} total (")
    assert "2 key/value heads (2 query heads per K/V head)" in card
    assert "4 SwiGLU experts of hidden size 32, each token routed to 2" in card

    # Training: the last train row of metrics.jsonl and what the checkpoint recorded of the machine.
    assert row_of(card, "steps") == f"{last_train['step']}" == "4"
    assert row_of(card, "trained for") == f"{last_train['tokens']:,} tokens in 4 steps"
    train_split = stats["splits"]["train"]
    books_word = "book" if train_split["books"] == 1 else "books"
    assert row_of(card, "training text") == (f"{train_split['tokens']:,} tokens ({train_split['bytes']:,} bytes) "
                                             f"in {train_split['books']} {books_word}")
    assert row_of(card, "tokens seen").startswith(f"{last_train['tokens']:,} ({last_train['epoch']:.3f} epochs")
    assert row_of(card, "final train loss") == f"{last_train['loss']:.4f} nats/token"
    assert last_train["elapsed_s"] < 60 and row_of(card, "training time").startswith(f"{last_train['elapsed_s']:.1f} s (")
    session = run.latest_checkpoint().read_meta()["hardware"]  # what the trainer ran with
    assert row_of(card, "hardware").startswith("CPU (") and row_of(card, "precision") == session["precision"]
    assert session["precision"] == "float32"  # what the tests' tables ask for

    # Evaluation: training's last val measurement, as metrics.jsonl has it...
    assert (f"| val | 4 | {last_eval['val_tokens']:,} | first part | {last_eval['val_loss']:.4f} | "
            f"{last_eval['val_perplexity']:.2f} | {last_eval['val_bits_per_byte']:.4f} | metrics.jsonl (training) |"
            in card)
    # ... and report's own whole-split measurements of val and test, recorded in evals.jsonl, on the summary.
    val, test = run.evals()
    for row in (val, test):
        assert row["step"] == 4 and row["whole_split"] and row["tokens"] == stats["splits"][row["split"]]["tokens"] - 1
        assert (f"| {row['split']} | 4 | {row['tokens']:,} | whole | {row['loss']:.4f} | {row['perplexity']:.2f} | "
                f"{row['bits_per_byte']:.4f} | evals.jsonl" in card)
        assert row_of(card, f"{row['split']} bits per byte") == f"{row['bits_per_byte']:.4f} (step 4, {row['tokens']:,} tokens)"
    # The test number is the test split's: computed here again from the checkpoint and stats.json's byte count.
    loaded, tokenizer, _ = load_for_inference(run.path)
    corpus = PreparedCorpus(data)
    again = evaluate_split(loaded, corpus.tokens("test"), 32, token_byte_lengths(tokenizer),
                           split_bytes=stats["splits"]["test"]["bytes"])
    assert f"{again['bits_per_byte']:.4f}" == f"{test['bits_per_byte']:.4f}" and test["bytes"] == stats["splits"]["test"]["bytes"]

    # Samples: the last sampled step's continuation of each prompt.
    for sample in run.samples()[-2:]:
        assert sample["step"] == 4 and sample["prompt"] + sample["text"] in card

    # Nothing above was unknown: "not recorded" appears only in the closing sentence that explains it.
    assert card.count("not recorded") == 1

    # A second report finds the measurements and does not evaluate again.
    assert main(["report", str(run.path), "--device", "cpu"]) == 0
    assert len(run.evals()) == 2 and run.model_card_path.read_text(encoding="utf-8") == card


def test_export_writes_the_card_as_the_hub_readme(trained, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    run, _ = trained
    hf = tmp_path / "hf"
    assert main(["export", str(run.path), "--out", str(hf)]) == 0
    readme = (hf / "README.md").read_text(encoding="utf-8")
    metadata = hub_metadata(ModelConfig(**run.read_config()["model"]))
    assert readme == metadata + "\n" + write_model_card(run).read_text(encoding="utf-8")
    header = front_matter(readme)
    assert header == {"language": ["pt"], "license": "mit", "library_name": "transformers",
                      "pipeline_tag": "text-generation", "tags": ["gtransformer", "mixtral", "moe", "gqa", "portuguese"]}
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        assert yaml.safe_load(readme[4:].partition("\n---\n")[0]) == header

    # The folder still loads in transformers, and the card's own snippet runs on it.
    assert type(transformers.AutoModelForCausalLM.from_pretrained(hf)).__name__ == "MixtralForCausalLM"
    snippet = re.search(r"```python\n(.*?)\n```", readme, re.DOTALL).group(1).replace('"FOLDER"', repr(str(hf)))
    exec(snippet, {})
    assert capsys.readouterr().out.startswith("Era uma vez")

    # An older checkpoint's card stops at its step: no later metrics, no later samples or measurements.
    assert main(["export", str(run.checkpoint(2).path), "--out", str(tmp_path / "hf2")]) == 0
    older = (tmp_path / "hf2" / "README.md").read_text(encoding="utf-8")
    assert row_of(older, "steps") == "2" and row_of(older, "val bits per byte") == "not measured"
    assert "Samples: not recorded" in older

    # A checkpoint copied out of its run exports too; what only the run folder held is "not recorded".
    bare = tmp_path / "bare"
    shutil.copytree(run.checkpoint(4).path, bare)
    shutil.copyfile(run.tokenizer_path, bare / "tokenizer.json")
    assert main(["export", str(bare), "--out", str(tmp_path / "hf3")]) == 0
    copied = (tmp_path / "hf3" / "README.md").read_text(encoding="utf-8")
    assert copied.startswith(metadata + "\n# bare\n")
    assert row_of(copied, "steps") == "4" and row_of(copied, "tokens seen") == f"{4 * 8 * 32:,}"
    assert row_of(copied, "hardware").startswith("CPU (") and row_of(copied, "final train loss") == "not recorded"


def test_card_of_a_run_whose_corpus_is_gone_says_what_it_does_not_know(tmp_path, make_corpus, tiny_tables):
    data = make_corpus(tmp_path / "data", sentences=150)  # stats.json with split sizes only, no manifest.json
    run = RunDir(tmp_path / "run")
    train(tiny_tables(data, max_steps=2), run.path, progress_bar=False)
    card = write_model_card(run).read_text(encoding="utf-8")
    stats = json.loads((data / "stats.json").read_text(encoding="utf-8"))["splits"]
    assert f"| val | 1 | {stats['val']['bytes']:,} | {stats['val']['tokens']:,} | not recorded |" in card
    assert "Books downloaded: not recorded; kept: 6; dropped: not recorded." in card
    assert "Which books are in each split: not recorded" in card

    shutil.rmtree(data)
    assert main(["report", str(run.path), "--device", "cpu"]) == 0  # nothing to measure the test split on
    card = run.model_card_path.read_text(encoding="utf-8")
    assert row_of(card, "training text") == "not recorded" and "the split sizes are not recorded" in card
    assert row_of(card, "test bits per byte") == "not measured" and "The test split was not measured" in card
    assert not run.evals_path.exists()
