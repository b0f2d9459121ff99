"""download + prepare over loopback HTTP on a slice of the real mirror (skipped when it is absent)."""

import json
import shutil

import pytest

from conftest import REAL_MIRROR
from gtransformer.cli import main
from gtransformer.data.catalog import CATALOG_PATH
from gtransformer.data.fetch import candidate_paths
from gtransformer.data.shards import read_shard
from gtransformer.data.tokenizer import Tokenizer

pytestmark = pytest.mark.skipif(not REAL_MIRROR.is_dir(), reason=f"{REAL_MIRROR} not present")

# Old small-print header (2837), ISO-8859-1 "THIS" marker (3333), UTF-8 files/ layout (13630),
# wrapped marker (35131), a Spanish book catalogued as Portuguese (52808), a book absent from the mirror (31552).
IDS = [2837, 3333, 13630, 35131, 52808, 31552]


def test_pipeline_over_http_on_real_books(tmp_path, serve_folder):
    mirror = tmp_path / "mirror"
    (mirror / CATALOG_PATH).parent.mkdir(parents=True)
    shutil.copy(REAL_MIRROR / CATALOG_PATH, mirror / CATALOG_PATH)
    for book_id in IDS:
        for relative in candidate_paths(book_id):
            if (REAL_MIRROR / relative).is_file():
                (mirror / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(REAL_MIRROR / relative, mirror / relative)
    url = serve_folder(mirror)
    raw, out = tmp_path / "raw", tmp_path / "prepared"
    ids = ",".join(map(str, IDS))
    assert main(["download", "--mirror", url, "--out", str(raw), "--ids", ids, "--no-progress"]) == 0
    assert main(["download", "--mirror", url, "--out", str(raw), "--ids", ids, "--no-progress"]) == 0  # resumes
    books = json.loads((raw / "manifest.json").read_text(encoding="utf-8"))["books"]
    assert books["31552"]["status"] == "missing" and books["2837"]["status"] == "ok"

    assert main(["prepare", "--raw", str(raw), "--out", str(out), "--vocab-size", "1024", "--split", "60/20/20"]) == 0
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    assert stats["books"] == {"raw": 5, "kept": 4, "dropped": 1}
    assert "not mostly Portuguese" in stats["dropped"]["52808"]
    tokenizer = Tokenizer.from_file(out / "tokenizer.json")
    text = "".join(tokenizer.decode(read_shard(out / f"{split}.bin")) for split in ("train", "val", "test"))
    for boilerplate in ("Project Gutenberg", "SMALL PRINT", "Produced by", "*** START", "\r"):
        assert boilerplate not in text
    assert "As armas e os barões assinalados,\nQue da ocidental praia Lusitana," in text  # verse kept as verse
    assert "consta—Presente estado das ideias" in text  # typewriter dashes normalised
