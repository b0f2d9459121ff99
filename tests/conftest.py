"""Shared fixtures: a tiny Gutenberg-layout mirror, a loopback HTTP server, a small prepared corpus and
model, and a recorder of the logits each generation step samples from."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import pytest
import torch

from gtransformer.data.tokenizer import Tokenizer
from gtransformer.data.toy import toy_corpus
from gtransformer.inference import sampling as sampling_module
from gtransformer.inference.decode import DecodeOptions
from gtransformer.inference.generate import generate
from gtransformer.inference.sampling import SamplingConfig
from gtransformer.model.config import ModelConfig
from gtransformer.model.model import GPT
from gtransformer.testing import start_serve
from gtransformer.training.checkpoint import save_checkpoint

REAL_MIRROR = Path(__file__).resolve().parents[1].parent / "shared" / "gutenberg-mirror"
NEEDS_CPP_COMPILER = pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
                                        reason="torch.compile on CPU needs a C++ compiler")

PORTUGUESE = (
    "O homem não sabia para onde ia, mas a estrada era longa e a noite caía sobre os campos. "
    "Ella tinha dito que elle voltaria com a carta do pae, e que todos estariam em casa quando "
    "o sino da egreja tocasse as ave-marias. {n}\n"
)
SPANISH = (
    "El hombre no sabía a dónde iba, pero el camino era largo y la noche caía sobre los campos. "
    "Ella había dicho que él volvería con la carta del padre, y que todos estarían en casa. {n}\n"
)


def portuguese_text(paragraphs: int = 30, seed: int = 0) -> str:
    return "\n".join(PORTUGUESE.format(n=f"Capitulo {seed}-{i}.") for i in range(paragraphs))


def gutenberg_file(title: str, body: str, style: str = "this", charset: str | None = "ISO-8859-1") -> str:
    """A book the way Gutenberg wraps it; `style` picks the marker generation."""
    header = f"The Project Gutenberg EBook of {title}\n\nTitle: {title}\n\nLanguage: Portuguese\n\n"
    if charset:
        header += f"Character set encoding: {charset}\n\n"
    if style == "this":
        start, end = f"*** START OF THIS PROJECT GUTENBERG EBOOK {title.upper()} ***", f"*** END OF THIS PROJECT GUTENBERG EBOOK {title.upper()} ***"
    elif style == "the":
        start, end = f"*** START OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***", f"*** END OF THE PROJECT GUTENBERG EBOOK {title.upper()} ***"
    elif style == "nospace":
        start, end = f"***START OF THE PROJECT GUTENBERG EBOOK {title.upper()}***", f"***END OF THE PROJECT GUTENBERG EBOOK {title.upper()}***"
    elif style == "wrapped":
        start = f"*** START OF THE PROJECT GUTENBERG EBOOK {title.upper()} E\nOUTRAS HISTORIAS ***"
        end = f"*** END OF THE PROJECT GUTENBERG EBOOK {title.upper()} E\nOUTRAS HISTORIAS ***"
    else:
        raise ValueError(style)
    return (
        header + start + "\n\n\nProduced by Fulano de Tal and the Online Distributed\nProofreading Team\n\n\n"
        + body + f"\n\n\nEnd of the Project Gutenberg EBook of {title}, by\nAlguem\n\n" + end
        + "\n\n*** START: FULL LICENSE ***\nTHE FULL PROJECT GUTENBERG LICENSE\nPlease read this.\n"
    )


def write_mirror(root: Path, books: dict[int, tuple[str, str, bytes | None, str]]) -> Path:
    """books: id -> (title, language, file bytes or None for a missing book, layout path template)."""
    (root / "cache/epub/feeds").mkdir(parents=True, exist_ok=True)
    lines = ["Text#,Type,Issued,Title,Language,Authors,Subjects,LoCC,Bookshelves"]
    for book_id, (title, language, data, layout) in books.items():
        lines.append(f'{book_id},Text,,"{title}",{language},"Autor, Um",,,')
        if data is not None:
            path = root / layout.format(id=book_id)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    lines.append('999,Sound,,"Audio book",pt,"Autor, Um",,,')
    lines.append('998,Text,,"A title with a\nnewline",en,"Someone",,,')
    (root / "cache/epub/feeds/pg_catalog.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def build_small_mirror(root: Path) -> Path:
    """Six Portuguese books in four layouts and three encodings, one Spanish book, one missing book."""
    def body(seed: int) -> str:
        return portuguese_text(30, seed)

    books = {
        101: ("Livro Um", "pt", gutenberg_file("Livro Um", body(1)).encode("latin-1"), "cache/epub/{id}/pg{id}.txt"),
        102: ("Livro Dois", "pt", ("\ufeff" + gutenberg_file("Livro Dois", body(2), "the", None)).encode("utf-8"), "files/{id}/{id}-0.txt"),
        103: ("Livro Tres", "pt", gutenberg_file("Livro Tres", body(3), "nospace", "ISO-8859-1").replace("\n", "\r\n").encode("latin-1"), "files/{id}/{id}-8.txt"),
        104: ("Livro Quatro", "pt", gutenberg_file("Livro Quatro", body(4), "wrapped", None).encode("utf-8"), "files/{id}/{id}.txt"),
        105: ("Livro Cinco", "pt; en", gutenberg_file("Livro Cinco", body(5)).encode("cp1252"), "cache/epub/{id}/pg{id}.txt"),
        106: ("Livro Seis", "pt", gutenberg_file("Livro Seis", body(6)).encode("latin-1"), "cache/epub/{id}/pg{id}.txt"),
        107: ("Libro Español", "pt", gutenberg_file("Libro", "\n".join(SPANISH.format(n=i) for i in range(30))).encode("latin-1"), "cache/epub/{id}/pg{id}.txt"),
        108: ("Livro Perdido", "pt", None, ""),
        200: ("English Book", "en", b"The end.", "cache/epub/{id}/pg{id}.txt"),
    }
    return write_mirror(root, books)


@pytest.fixture
def small_mirror(tmp_path: Path) -> Path:
    """build_small_mirror's books in tmp_path / "mirror"."""
    return build_small_mirror(tmp_path / "mirror")


@pytest.fixture(scope="session", name="small_mirror_factory")
def small_mirror_factory_fixture():
    """build_small_mirror(root) -> root, a Gutenberg-layout mirror of a few small books."""
    return build_small_mirror


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def serve_folder():
    """serve_folder(path, handler_class=None) -> base URL of a 127.0.0.1 server on a free port."""
    servers = []

    def start(folder: Path, handler_class=_QuietHandler) -> str:
        handler = functools.partial(handler_class, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        # Shut down within 50 ms: some tests start many servers.
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run much faster on one intra-op thread when other jobs share the cores (no OpenMP spin-waits)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- a small prepared corpus and the tables of a model that trains a step in milliseconds -------------


def tiny_tables(data: Path, **train) -> dict:
    """[model]/[train]/[data] tables for a model that trains a step in milliseconds."""
    return {
        "model": {"vocab_size": 384, "context_length": 32, "d_model": 32, "n_layers": 2, "n_heads": 4,
                  "n_kv_heads": 2, "n_experts": 4, "top_k": 2, "expert_hidden": 32},
        # float32: precision "auto" is bfloat16 on CPUs with AMX or AVX-512 BF16, and the tests' numbers must
        # not depend on the machine (auto's own choice is tested in test_train.py).
        "train": {"batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "log_every": 1, "eval_every": 0, "precision": "float32",
                  "eval_tokens": 256, "checkpoint_every": 0, "sample_prompts": [], "tensorboard": False, **train},
        "data": {"path": str(data)},
    }


@pytest.fixture(scope="session", name="make_corpus")
def make_corpus_fixture():
    """make_corpus(folder, vocab_size=384, sentences=600) -> a prepared-corpus folder (`data.toy.toy_corpus`)."""
    return toy_corpus


@pytest.fixture(scope="session", name="tiny_tables")
def tiny_tables_fixture():
    """tiny_tables(data, **train) -> [model]/[train]/[data] tables."""
    return tiny_tables


# --- a small model and what each generation step sampled from ------------------------------------------


def make_model(vocab_size: int = 300, **overrides) -> GPT:
    torch.manual_seed(0)
    values = dict(
        vocab_size=vocab_size, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
        n_experts=4, top_k=2, expert_hidden=32, init_std=0.1,
    )
    values.update(overrides)
    return GPT(ModelConfig(**values)).eval()


def record_step_logits(model, prompts, n_new, **options):
    """Run greedy generation and keep the logits each step sampled from (prefill, then the decoding steps).

    options: `DecodeOptions` fields (dtype, compile, ...)."""
    seen = []
    original = sampling_module.sample_next

    def recording(logits, *args):
        seen.append(logits.clone())
        return original(logits, *args)

    sampling_module.sample_next = recording
    try:
        tokens = generate(model, prompts, SamplingConfig(max_new_tokens=n_new, temperature=0), DecodeOptions(**options))
    finally:
        sampling_module.sample_next = original
    return tokens, seen


def assert_matches_full_recompute(model, prompts, tokens, step_logits, atol=1e-5):
    """Each step's logits (from `record_step_logits`) equal the model's forward over prompt + tokens so far."""
    with torch.no_grad():
        for i, cached in enumerate(step_logits):
            for row, prompt in enumerate(prompts):
                full = model(torch.tensor([prompt + tokens[row][:i]])).logits[0, -1].float()
                torch.testing.assert_close(cached[row], full, atol=atol, rtol=0)


@pytest.fixture(scope="session", name="make_model")
def make_model_fixture():
    """make_model(vocab_size=300, **ModelConfig overrides) -> a seeded tiny GQA + MoE GPT in eval mode."""
    return make_model


@pytest.fixture(scope="session", name="record_step_logits")
def record_step_logits_fixture():
    """record_step_logits(model, prompts, n_new, **decode_options) -> (tokens, logits of each step)."""
    return record_step_logits


# --- a run folder and a `gtransformer serve` subprocess ---------------------------------------------------

KEY = "test-key-0123456789"  # the API key the served tests use (never a real one)
RUN_TEXT = (
    "O coração da nação bateu mais forte. Ação e reação, é só o começo: ótimo, avó, maçã, pão. "
    "Não há razão para não ler Machado de Assis e Eça de Queirós à noite. "
) * 3


def make_run(folder: Path, **model_overrides) -> Path:
    """A run folder (one checkpoint, tokenizer.json) holding make_model's seeded random model."""
    tokenizer = Tokenizer.train_bpe([RUN_TEXT], vocab_size=300, min_frequency=1)
    model = make_model(vocab_size=tokenizer.vocab_size, **model_overrides)
    save_checkpoint(folder, 1, model.state_dict(), {}, {"config": {"model": model.config.to_dict()}})
    tokenizer.save(folder / "tokenizer.json")
    return folder


@pytest.fixture(scope="session", name="make_run")
def make_run_fixture():
    """make_run(folder, **ModelConfig overrides) -> a run folder that eval, generate and serve load."""
    return make_run


def start_server(run: Path, *extra: str, env_key: str | None = KEY) -> tuple[subprocess.Popen, str]:
    """`gtransformer serve RUN --device cpu EXTRA...` on one thread, with GT_TEST_KEY set to `env_key`:
    (the process, its base URL)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GT_TEST_KEY": env_key or ""}
    return start_serve(run, "--device", "cpu", *extra, env=env)


def stop_server(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 0, err[-2000:]
    return err
