"""Export to Hugging Face Mixtral and import back."""

import argparse
import json

import pytest
import torch

from gtransformer.commands import export as export_command
from gtransformer.training.checkpoint import save_checkpoint
from gtransformer.errors import UserError
from gtransformer.inference.generate import generate
from gtransformer.inference.sampling import SamplingConfig
from gtransformer.interop.hf import export_hf, hub_metadata, import_hf
from gtransformer.data.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

TEXT = "O coração da nação bateu mais forte. Ação e reação, é só o começo: ótimo, avó, maçã, pão. " * 3


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train_bpe([TEXT], vocab_size=300, min_frequency=1)


@pytest.fixture(scope="module")
def exported(tokenizer, tmp_path_factory, make_model):
    model = make_model(tokenizer.vocab_size, rope_theta=5000.0)
    folder = export_hf(model, tokenizer, tmp_path_factory.mktemp("export") / "hf")
    return model, folder


def test_transformers_loads_the_export_and_agrees_on_logits(exported):
    model, folder = exported
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    assert type(hf_model).__name__ == "MixtralForCausalLM"
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (3, 40))
    with torch.no_grad():
        ours = model(ids).logits
        theirs = hf_model(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_transformers_greedy_generate_gives_our_32_tokens(exported):
    model, folder = exported
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    prompt = [5, 17, 42, 8]
    ours = generate(model, [prompt], SamplingConfig(max_new_tokens=32, temperature=0))[0]
    with torch.no_grad():
        theirs = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )[0, len(prompt):].tolist()
    assert len(ours) == 32 and ours == theirs


def test_auto_tokenizer_loads_the_export(exported, tokenizer):
    _, folder = exported
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    text = "Ação e reação: ótimo!"
    assert hf_tokenizer(text, add_special_tokens=False).input_ids == tokenizer.encode(text)
    assert hf_tokenizer.eos_token_id == tokenizer.eot_id
    assert hf_tokenizer.decode(tokenizer.encode(text)) == text


def test_a_model_card_becomes_the_readme_behind_the_hub_header(exported, tokenizer, tmp_path, make_model):
    _, folder = exported
    assert not (folder / "README.md").exists()  # no card given, no README
    model = make_model(tokenizer.vocab_size, rope_theta=5000.0)
    carded = export_hf(model, tokenizer, tmp_path / "carded", model_card="# card\n")
    assert (carded / "README.md").read_text(encoding="utf-8") == hub_metadata(model.config) + "\n# card\n"


def test_import_of_export_gives_identical_weights(exported, tokenizer):
    model, folder = exported
    imported, imported_tokenizer = import_hf(folder)
    assert imported.config.to_dict() == {**model.config.to_dict(), "head_dim": 8}
    original, loaded = model.state_dict(), imported.state_dict()
    assert original.keys() == loaded.keys()
    for name in original:
        assert torch.equal(original[name], loaded[name]), name
    assert imported_tokenizer.encode("coração") == tokenizer.encode("coração")


def test_import_reads_what_transformers_save_pretrained_writes(exported, tmp_path):
    model, folder = exported
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    hf_model.save_pretrained(tmp_path / "resaved")
    imported, _ = import_hf(tmp_path / "resaved")
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, imported.state_dict()[name]), name


def test_tied_embeddings_round_trip(tokenizer, tmp_path, make_model):
    model = make_model(tokenizer.vocab_size, rope_theta=5000.0, tie_embeddings=True)
    folder = export_hf(model, tokenizer, tmp_path / "tied")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert (model(ids).logits - hf_model(ids).logits).abs().max().item() < 1e-4
    imported, _ = import_hf(folder)
    assert imported.lm_head.weight is imported.embed_tokens.weight
    assert torch.equal(imported.lm_head.weight, model.lm_head.weight)


def test_a_dense_model_exports_as_a_one_expert_mixtral_with_the_same_logits(tokenizer, tmp_path, make_model):
    model = make_model(tokenizer.vocab_size, rope_theta=5000.0, n_experts=0, dense_hidden=40)
    folder = export_hf(model, tokenizer, tmp_path / "dense", model_card="# dense\n")
    assert "- moe\n" not in (folder / "README.md").read_text(encoding="utf-8")  # tagged as what it is
    assert "- moe\n- gqa\n" in hub_metadata(make_model(tokenizer.vocab_size).config)
    config = json.loads((folder / "config.json").read_text())
    assert (config["num_local_experts"], config["num_experts_per_tok"], config["intermediate_size"]) == (1, 1, 40)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    imported, _ = import_hf(folder)
    with torch.no_grad():
        ours = model(ids).logits
        assert (ours - hf_model(ids).logits).abs().max().item() < 1e-4
        assert (ours - imported.eval()(ids).logits).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    "overrides, option",
    [
        (dict(qk_norm=True), "qk_norm"),
        (dict(n_shared_experts=1), "n_shared_experts"),
        (dict(moe_every=2), "moe_every"),
    ],
)
def test_options_mixtral_cannot_represent_are_named(tokenizer, tmp_path, overrides, option, make_model):
    model = make_model(tokenizer.vocab_size, rope_theta=5000.0, **overrides)
    with pytest.raises(UserError, match="cannot be exported as Mixtral") as info:
        export_hf(model, tokenizer, tmp_path / "out")
    assert option in str(info.value)
    assert not (tmp_path / "out").exists()


def test_bias_balancing_exports_only_while_biases_are_zero(tokenizer, tmp_path, make_model):
    model = make_model(tokenizer.vocab_size, rope_theta=5000.0, balance="bias")
    export_hf(model, tokenizer, tmp_path / "zero")
    with torch.no_grad():
        model.layers[0].mlp.gate.expert_bias[1] = 0.01
    with pytest.raises(UserError, match='balance = "bias"'):
        export_hf(model, tokenizer, tmp_path / "biased")


def test_export_never_overwrites_without_force(exported, tokenizer, tmp_path):
    model, _ = exported
    target = tmp_path / "taken"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="--force"):
        export_hf(model, tokenizer, target)
    assert (target / "notes.txt").read_text() == "keep me"
    export_hf(model, tokenizer, target, force=True)
    assert (target / "config.json").is_file() and not (target / "notes.txt").exists()


def test_export_command_from_a_run_folder(tokenizer, tmp_path, make_model):
    model = make_model(tokenizer.vocab_size, rope_theta=5000.0)
    run = tmp_path / "run"
    save_checkpoint(run, 3, model.state_dict(), {}, {"config": {"model": model.config.to_dict()}})
    tokenizer.save(run / "tokenizer.json")
    parser = argparse.ArgumentParser()
    export_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["export", str(run), "--format", "hf", "--out", str(tmp_path / "hf"), "--dtype", "bfloat16"])
    assert args.func(args) in (0, None)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["torch_dtype"] == "bfloat16"
    imported, _ = import_hf(tmp_path / "hf")
    torch.testing.assert_close(imported.layers[0].mlp.experts.w2, model.layers[0].mlp.experts.w2.bfloat16().float())
    with pytest.raises(UserError, match="no config.json"):
        import_hf(tmp_path)
