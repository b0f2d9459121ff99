"""Export to and import from Hugging Face `transformers` (Mixtral layout); the `export` command.

Our tensors already carry Mixtral's names and RoPE layout, so export is a
renaming: `layers.i.mlp.*` -> `model.layers.i.block_sparse_moe.*`, and the
stacked experts are split into one w1/w2/w3 per expert. That per-expert file
layout is what Mixtral checkpoints on the Hub use: transformers 4.x reads it
directly and 5.x fuses it on load (gate_up_proj/down_proj). Import accepts
both that layout and 5.x's fused one (what `save_pretrained` may write).

A dense model (n_experts = 0) exports as a Mixtral with one expert per layer
chosen for every token (top-1 of one, zero router weights: mixing weight 1), its
SwiGLU as that expert: the same function, and the same loaders. Import reads it
back as that one-expert MoE.

Given a model card (training/model_card.py), export writes it as the folder's
README.md behind the Hub's YAML metadata header (`hub_metadata`), so the folder
uploads to the Hugging Face Hub as it is.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from gtransformer.data.tokenizer import EOT, Tokenizer
from gtransformer.errors import UserError
from gtransformer.model.config import ModelConfig
from gtransformer.model.model import GPT
from gtransformer.model.primitives import rope_tables


def hub_metadata(config: ModelConfig) -> str:
    """The Hub's model-card metadata (YAML front matter) for a model of this config.

    The weights are MIT like the code; the card's License section says the training texts are public domain.
    `datasets` is left out: the corpus is a selection of Project Gutenberg books prepared by gtransformer, not a
    Hub dataset, and the card lists the books instead. The tags say what the model is: "moe" only with experts
    (a dense model is exported as a one-expert Mixtral), "gqa" only with fewer K/V heads than query heads.
    """
    tags = ["gtransformer", "mixtral", *(["moe"] if config.n_experts else []),
            *(["gqa"] if config.n_kv_heads < config.n_heads else []), "portuguese"]
    return ("---\nlanguage:\n- pt\nlicense: mit\nlibrary_name: transformers\npipeline_tag: text-generation\n"
            "tags:\n" + "".join(f"- {tag}\n" for tag in tags)
            + "# datasets: none on the Hub; the training books (Project Gutenberg, public domain) are listed in the "
            "card\n---\n")


def mixtral_incompatibilities(config: ModelConfig) -> list[str]:
    """The [model] options Mixtral cannot represent, each named with the reason (empty when it can)."""
    problems = []
    if config.n_experts and config.moe_every != 1:
        problems.append(f"moe_every = {config.moe_every} (Mixtral has an MoE feed-forward in every layer)")
    if config.n_shared_experts:
        problems.append(f"n_shared_experts = {config.n_shared_experts} (Mixtral has no shared experts)")
    if config.qk_norm:
        problems.append("qk_norm = true (Mixtral has no query/key normalisation)")
    return problems


def check_exportable(model) -> None:
    """Raise one UserError naming the first option Mixtral cannot represent."""
    problems = mixtral_incompatibilities(model.config)
    if model.config.balance == "bias":
        biased = [
            i for i, block in enumerate(model.layers)
            if block.is_moe and bool(block.mlp.gate.expert_bias.abs().max() > 0)
        ]
        if biased:
            problems.append(
                f'balance = "bias" with non-zero router biases (layers {biased[:4]}...); Mixtral routes without '
                "a bias, so it would pick different experts"
            )
    if problems:
        raise UserError(f"this model cannot be exported as Mixtral: {problems[0]}; retrain without that option")


def mixtral_config(config: ModelConfig, bos_eos_id: int | None, dtype: torch.dtype) -> dict:
    """config.json of a Mixtral with exactly this architecture (the one mapping of our names to Mixtral's)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        # A dense model: one expert per layer, its SwiGLU (see the module docstring).
        "intermediate_size": config.expert_hidden if config.n_experts else config.resolved_dense_hidden,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,  # transformers 4.x
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},  # transformers 5.x
        "tie_word_embeddings": config.tie_embeddings,
        "num_local_experts": config.n_experts or 1,
        "num_experts_per_tok": config.top_k if config.n_experts else 1,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "router_aux_loss_coef": config.aux_loss_coef,
        "router_jitter_noise": 0.0,
        "initializer_range": config.init_std,
        "use_cache": True,
        "bos_token_id": bos_eos_id,
        "eos_token_id": bos_eos_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def to_mixtral_state_dict(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our state dict under Mixtral's per-expert names (each tensor its own contiguous copy)."""
    out: dict[str, torch.Tensor] = {}

    def put(name: str, tensor: torch.Tensor) -> None:
        out[name] = tensor.detach().to("cpu", dtype).contiguous().clone()

    put("model.embed_tokens.weight", model.embed_tokens.weight)
    for i, block in enumerate(model.layers):
        prefix = f"model.layers.{i}"
        put(f"{prefix}.input_layernorm.weight", block.input_layernorm.weight)
        put(f"{prefix}.post_attention_layernorm.weight", block.post_attention_layernorm.weight)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            put(f"{prefix}.self_attn.{proj}.weight", getattr(block.self_attn, proj).weight)
        if not block.is_moe:  # a dense layer: the one expert of a zero router
            put(f"{prefix}.block_sparse_moe.gate.weight", block.mlp.w1.weight.new_zeros(1, model.config.d_model))
            for w in ("w1", "w2", "w3"):
                put(f"{prefix}.block_sparse_moe.experts.0.{w}.weight", getattr(block.mlp, w).weight)
            continue
        put(f"{prefix}.block_sparse_moe.gate.weight", block.mlp.gate.weight)
        experts = block.mlp.experts
        for e in range(model.config.n_experts):
            for w in ("w1", "w2", "w3"):
                put(f"{prefix}.block_sparse_moe.experts.{e}.{w}.weight", getattr(experts, w)[e])
    put("model.norm.weight", model.norm.weight)
    if not model.config.tie_embeddings:
        put("lm_head.weight", model.lm_head.weight)
    return out


def write_tokenizer(tokenizer, folder: Path, context_length: int) -> None:
    if getattr(tokenizer, "kind", "bpe") != "bpe":
        raise UserError(
            "a tiktoken-based tokenizer cannot be exported as tokenizer.json; "
            "export works for models trained with our own BPE (prepare without --tiktoken)"
        )
    tokenizer.save(folder / "tokenizer.json")
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                **special,
                "model_max_length": context_length,
                "clean_up_tokenization_spaces": False,
                "add_bos_token": False,
                "add_eos_token": False,
            },
            indent=2,
        ),
        encoding="utf-8",
    )
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")


def export_hf(model, tokenizer, out_dir: str | Path, dtype: torch.dtype = torch.float32, force: bool = False,
              model_card: str | None = None) -> Path:
    """Write a folder that AutoModelForCausalLM / AutoTokenizer.from_pretrained load offline.

    With `model_card` (Markdown), README.md is `hub_metadata` followed by the card.

    Written to a temporary sibling folder and renamed at the end, so a failed
    export never leaves half a folder; an existing non-empty folder is only
    replaced with force=True.
    """
    check_exportable(model)
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise UserError(f"--out {out_dir} already exists and is not empty; pick a new folder or pass --force")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    eot = getattr(tokenizer, "eot_id", None) if tokenizer is not None else None
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        save_file(to_mixtral_state_dict(model, dtype), tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(mixtral_config(model.config, eot, dtype), indent=2), encoding="utf-8")
        generation = {"bos_token_id": eot, "eos_token_id": eot, "max_length": model.config.context_length}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
        if tokenizer is not None:
            write_tokenizer(tokenizer, tmp, model.config.context_length)
        if model_card is not None:
            (tmp / "README.md").write_text(hub_metadata(model.config) + "\n" + model_card, encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder} has no *.safetensors weights; export with safetensors (pytorch_model.bin is not read)")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def import_hf(folder: str | Path, device: str | torch.device = "cpu"):
    """Read a Mixtral folder (ours or any compatible one) -> (GPT, Tokenizer or None)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder} has no config.json; pass a folder written by `gtransformer export --format hf`")
    hf = json.loads(config_path.read_text(encoding="utf-8"))
    if hf.get("model_type") != "mixtral":
        raise UserError(f"{folder} holds a {hf.get('model_type')!r} model; only Mixtral folders can be imported")
    if hf.get("hidden_act", "silu") != "silu" or hf.get("sliding_window"):
        raise UserError(f"{folder}: only silu activations without sliding-window attention can be imported")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise UserError(f"{folder}: rope_type {rope['rope_type']!r} is not supported; only default RoPE")
    config = ModelConfig(
        vocab_size=hf["vocab_size"],
        context_length=hf["max_position_embeddings"],
        d_model=hf["hidden_size"],
        n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"],
        n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"),
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1e6))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        n_experts=hf["num_local_experts"],
        top_k=hf["num_experts_per_tok"],
        expert_hidden=hf["intermediate_size"],
        aux_loss_coef=float(hf.get("router_aux_loss_coef", 0.01)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )
    tensors = _read_tensors(folder)
    with torch.device("meta"):
        model = GPT(config)
    state = from_mixtral_state_dict(tensors, config)
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # The RoPE tables are not saved (persistent=False): rebuild them on the real device.
    model.rope_cos, model.rope_sin = rope_tables(config.resolved_head_dim, config.context_length, config.rope_theta)
    model.to(device).eval()
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(folder / "tokenizer.json")
    return model, tokenizer


def from_mixtral_state_dict(tensors: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    def take(name: str) -> torch.Tensor:
        if name not in tensors:
            raise UserError(f"weight {name} is missing from the Hugging Face folder; is it a complete Mixtral export?")
        return tensors[name].float()

    state = {"embed_tokens.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    state["lm_head.weight"] = (
        state["embed_tokens.weight"] if config.tie_embeddings and "lm_head.weight" not in tensors
        else take("lm_head.weight")
    )
    h = config.expert_hidden
    for i in range(config.n_layers):
        src, dst = f"model.layers.{i}", f"layers.{i}"
        state[f"{dst}.input_layernorm.weight"] = take(f"{src}.input_layernorm.weight")
        state[f"{dst}.post_attention_layernorm.weight"] = take(f"{src}.post_attention_layernorm.weight")
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"{dst}.self_attn.{proj}.weight"] = take(f"{src}.self_attn.{proj}.weight")
        if f"{src}.mlp.experts.gate_up_proj" in tensors:  # transformers 5.x fused layout
            gate_up = take(f"{src}.mlp.experts.gate_up_proj")
            w1, w3 = gate_up[:, :h], gate_up[:, h:]
            w2 = take(f"{src}.mlp.experts.down_proj")
            gate = take(f"{src}.mlp.gate.weight")
        else:  # per-expert layout (Hub checkpoints, transformers 4.x, our export)
            moe = f"{src}.block_sparse_moe"
            w1, w2, w3 = (
                torch.stack([take(f"{moe}.experts.{e}.{w}.weight") for e in range(config.n_experts)])
                for w in ("w1", "w2", "w3")
            )
            gate = take(f"{moe}.gate.weight")
        state[f"{dst}.mlp.gate.weight"] = gate
        state[f"{dst}.mlp.experts.w1"] = w1.contiguous()
        state[f"{dst}.mlp.experts.w2"] = w2.contiguous()
        state[f"{dst}.mlp.experts.w3"] = w3.contiguous()
    return state
