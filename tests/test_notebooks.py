"""The notebooks end to end: notebooks/train.ipynb run by papermill at the CI scale of notebooks/ci.yaml (against
../shared's Gutenberg mirror, or a synthetic one where that is absent), then notebooks/explore.ipynb on the run it
trained. A failing cell fails the test (papermill's PapermillExecutionError names the cell and its traceback)."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import nbformat
import papermill
import pytest
import torch
import yaml

from conftest import REAL_MIRROR, gutenberg_file, portuguese_text, write_mirror

from gtransformer.runtime import resolve_precision

pytestmark = pytest.mark.slow

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def synthetic_mirror(root: Path) -> Path:
    """Six small Portuguese books in Gutenberg's layout, for checkouts without ../shared."""
    books = {
        100 + i: (f"Livro {i}", "pt", gutenberg_file(f"Livro {i}", portuguese_text(60, i)).encode("latin-1"),
                  "cache/epub/{id}/pg{id}.txt")
        for i in range(1, 7)
    }
    return write_mirror(root, books)


def execute(name: str, out: Path, parameters: dict) -> nbformat.NotebookNode:
    """Run notebooks/NAME in the notebooks folder, as Jupyter would, with the kernel `python3` of this Python
    (jupyter_client starts the native kernel with sys.executable, so it imports this checkout's gtransformer)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PREFER_ENV_PATH", "1")  # this environment's kernelspecs before a user's
        papermill.execute_notebook(str(NOTEBOOKS / name), str(out), parameters=parameters, cwd=str(NOTEBOOKS),
                                   kernel_name="python3", progress_bar=False)
    return nbformat.read(out, as_version=4)


def outputs(notebook: nbformat.NotebookNode, mime: str) -> list[str]:
    """Every stream text (mime "stream") or every output of the given MIME type, cell by cell."""
    found = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if mime == "stream" and output.output_type == "stream":
                found.append(output.text)
            elif mime in output.get("data", {}):
                found.append(output.data[mime])
    return found


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, nbformat.NotebookNode]:
    """(workdir, executed notebook) of train.ipynb at the CI scale."""
    root = tmp_path_factory.mktemp("notebooks")
    parameters = yaml.safe_load((NOTEBOOKS / "ci.yaml").read_text(encoding="utf-8"))
    if REAL_MIRROR.is_dir():
        parameters["mirror"] = str(REAL_MIRROR)
    else:  # the notebook's default book ids are real Gutenberg books: take whatever the synthetic catalog has
        parameters.update(mirror=str(synthetic_mirror(root / "mirror")), book_ids=None)
    parameters["workdir"] = str(root / "work")
    return root / "work", execute("train.ipynb", root / "train.ipynb", parameters)


def test_train_notebook_trains_evaluates_generates_and_exports(trained):
    workdir, notebook = trained
    run = workdir / "runs" / "notebook"
    assert sorted(run.glob("checkpoints/step-*/model.safetensors")), "no checkpoint in the run folder"
    with zipfile.ZipFile(workdir / "exports" / "notebook-hf.zip") as archive:
        assert {"notebook-hf/config.json", "notebook-hf/model.safetensors",
                "notebook-hf/tokenizer.json"} <= set(archive.namelist())
    text = "".join(outputs(notebook, "stream"))
    for split in ("val", "test"):
        assert f"{split:4s} step " in text and "bits per byte" in text, f"no {split} evaluation printed"
    expected = resolve_precision("auto", torch.device("cpu"))  # float32, or bfloat16 on CPUs with native bf16
    assert f"precision {expected}" in text and "device cpu" in text  # the device cell and the trainer's log agree
    assert len(text) < 200_000, "the progress bars flooded the output"
    # The live loss curves (updated in place while training), then the report's loss and expert-load plots.
    assert len(outputs(notebook, "image/png")) >= 3
    assert "samples at step" in "".join(outputs(notebook, "text/plain"))


def test_explore_notebook_on_the_trained_run(trained, tmp_path):
    if not (NOTEBOOKS / "explore.ipynb").is_file():
        pytest.skip("notebooks/explore.ipynb is not in this checkout (yet): only train.ipynb ran")
    workdir, _ = trained
    run = workdir / "runs" / "notebook"
    notebook = execute("explore.ipynb", tmp_path / "explore.ipynb", {"run": str(run), "max_tokens": 5000})
    text = "".join(outputs(notebook, "stream"))
    # Loading: the run's newest checkpoint, a GQA + MoE model, and the corpus the run recorded.
    newest = sorted(run.glob("checkpoints/step-*"))[-1]
    loaded = re.search(r"checkpoint: (\S+) \(step (\d+)\)", text)
    assert loaded and Path(loaded[1]).name == newest.name and int(loaded[2]) == int(newest.name.split("-")[1])
    shape = re.search(r"(\d+) query heads sharing (\d+) K/V heads, (\d+) experts \(top-\d+\)", text)
    assert shape, "no model line printed"
    n_heads, n_kv_heads, n_experts = map(int, shape.groups())
    assert n_kv_heads < n_heads
    assert "corpus: " in text and "none recorded" not in text
    # 2. Expert loads on the validation tokens: each MoE layer's router entropy, at most log(n_experts).
    assert f"router entropy (nats), maximum log({n_experts})" in text
    shares = [int(share) for share in re.findall(r"  layer \d+: [\d.]+ \((\d+)% of the maximum\)", text)]
    assert shares and all(0 <= share <= 100 for share in shares)
    assert "most often:" in text and "most specific" in text
    # 4. The KV-cache table: multi-head attention keeps n_heads / n_kv_heads times the bytes of GQA.
    table = [tuple(map(int, row)) for row in re.findall(r"^ *(\d+) +(\d+) +(\d+)$", text, re.M)]
    assert table and table[-1][2] / table[-1][1] == pytest.approx(n_heads / n_kv_heads, rel=0.01)
    # 5. The tokenizer: frequent and long tokens, and the BPE's tokens per word of validation text.
    assert "most frequent:" in text and "longest:" in text
    per_word = re.search(r"gtransformer BPE: ([\d.]+) tokens per word on (\d+) words of validation text", text)
    assert per_word and float(per_word[1]) > 0 and int(per_word[2]) > 0
    assert "explored in " in text
    # Figures: routing of the sentence, expert loads, one attention map per K/V head, KV cache, token pieces;
    # HTML: the routing table, the two top-token tables and the tokenizers' cuts of the sentence.
    assert len(outputs(notebook, "image/png")) == 4 + n_kv_heads
    assert len(outputs(notebook, "text/html")) == 4
