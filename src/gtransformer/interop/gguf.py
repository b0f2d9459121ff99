"""Export to GGUF, the file llama.cpp, Ollama, LM Studio and llama-server load; an Ollama Modelfile beside it.

Written with `gguf`, llama.cpp's own writer. Our model is llama.cpp's `llama`
architecture: a dense model is plain Llama (ffn_gate/ffn_up/ffn_down), an MoE
model is Llama with experts, the way llama.cpp reads Mixtral (ffn_gate_inp and
the stacked ffn_{gate,up,down}_exps; softmax over the router's logits, top-k,
weights renormalised: our `select_experts`). GQA, RoPE theta, the RMSNorm
epsilon, head_dim and a tied head (no `output.weight`: llama.cpp then reads
token_embd) carry over.

Two layouts differ from ours:
- RoPE. We rotate the two halves of a head (`rotate_half`, "NeoX" order);
  llama.cpp's llama rotates adjacent pairs. Permuting the rows of the query and
  key projections within each head (`interleave_rope_rows`, what llama.cpp's
  convert_hf_to_gguf.py does) gives the same scores.
- The tokenizer. Our byte-level BPE (`tokenizers`, GPT-2's pre-tokenizer regex,
  no normaliser, no prefix space) is llama.cpp's "gpt2" model with the "gpt-2"
  pre-tokenizer: the same regex, so the same ids; the tests check it on
  Portuguese text. `<|endoftext|>` is the control token that ends generation;
  nothing is added before a prompt (as `generate` does).

dtype: "f32", "f16" or "q8_0" for the matrices (8-bit blocks of 32 with one
scale each); norms and the router stay f32, as llama.cpp's converter keeps them,
and a matrix whose rows are not a multiple of 32 falls back to f16 under q8_0.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

from gtransformer.data.tokenizer import EOT, Tokenizer
from gtransformer.errors import UserError
from gtransformer.files import sync_path
from gtransformer.inference.chat import DEFAULT, ChatTemplate
from gtransformer.model.config import ModelConfig

DTYPES = ("f32", "f16", "q8_0")
ARCHITECTURE = "llama"


def gguf_incompatibilities(config: ModelConfig) -> list[str]:
    """The [model] options llama.cpp's llama architecture cannot express, each with the reason (empty if none)."""
    problems = []
    if config.qk_norm:
        problems.append("qk_norm = true (llama.cpp's llama architecture has no query/key normalisation)")
    if config.n_shared_experts:
        problems.append(f"n_shared_experts = {config.n_shared_experts} (llama.cpp's llama architecture has no "
                        "shared experts)")
    if config.n_experts and config.moe_every != 1:
        problems.append(f"moe_every = {config.moe_every} (llama.cpp's llama architecture has experts in every "
                        "layer or in none)")
    return problems


def check_exportable(model, tokenizer: Tokenizer) -> None:
    """Raise one UserError naming the first thing a GGUF file of the llama architecture cannot carry."""
    problems = gguf_incompatibilities(model.config)
    if model.config.balance == "bias":
        biased = [i for i, block in enumerate(model.layers)
                  if block.is_moe and bool(block.mlp.gate.expert_bias.abs().max() > 0)]
        if biased:
            problems.append(f'balance = "bias" with non-zero router biases (layers {biased[:4]}); llama.cpp routes '
                            "without a bias, so it would pick different experts")
    if problems:
        raise UserError(f"this model cannot be exported to GGUF: {problems[0]}; retrain without that option")
    if tokenizer.kind != "bpe":
        raise UserError(f"a tiktoken tokenizer ({tokenizer.encoding_name}) cannot be written into GGUF; export "
                        "works for models trained with our own BPE (prepare without --tiktoken)")
    if not tokenizer.bpe_vocabulary()[1]:
        raise UserError(f"the tokenizer has no merges ({tokenizer.vocab_size} tokens: bytes only) and llama.cpp "
                        "refuses such a file; prepare with a larger --vocab-size")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{model.config.vocab_size}; the run folder mixes two corpora")


def interleave_rope_rows(weight_OD: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a query/key projection reordered for pairwise RoPE: within each head, row i of the first half and
    row i of the second half become rows 2i and 2i+1 (the rotation llama.cpp's llama applies to adjacent pairs)."""
    out_features, d_model = weight_OD.shape
    head_dim = out_features // n_heads
    return (weight_OD.reshape(n_heads, 2, head_dim // 2, d_model).transpose(1, 2).reshape(out_features, d_model))


def llama_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor) for every weight, under llama.cpp's names (gguf.TENSOR_NAMES)."""
    names, T = gguf.TENSOR_NAMES, gguf.MODEL_TENSOR
    config = model.config
    out = [(names[T.TOKEN_EMBD], model.embed_tokens.weight)]
    for i, block in enumerate(model.layers):
        attention = block.self_attn

        def name(tensor) -> str:
            return names[tensor].format(bid=i)

        out += [
            (name(T.ATTN_NORM), block.input_layernorm.weight),
            (name(T.ATTN_Q), interleave_rope_rows(attention.q_proj.weight, config.n_heads)),
            (name(T.ATTN_K), interleave_rope_rows(attention.k_proj.weight, config.n_kv_heads)),
            (name(T.ATTN_V), attention.v_proj.weight),
            (name(T.ATTN_OUT), attention.o_proj.weight),
            (name(T.FFN_NORM), block.post_attention_layernorm.weight),
        ]
        if block.is_moe:
            experts = block.mlp.experts
            out += [(name(T.FFN_GATE_INP), block.mlp.gate.weight), (name(T.FFN_GATE_EXP), experts.w1),
                    (name(T.FFN_UP_EXP), experts.w3), (name(T.FFN_DOWN_EXP), experts.w2)]
        else:
            mlp = block.mlp
            out += [(name(T.FFN_GATE), mlp.w1.weight), (name(T.FFN_UP), mlp.w3.weight),
                    (name(T.FFN_DOWN), mlp.w2.weight)]
    out.append((names[T.OUTPUT_NORM], model.norm.weight))
    if not config.tie_embeddings:
        out.append((names[T.OUTPUT], model.lm_head.weight))
    return [(f"{n}.weight", t.detach().to("cpu", torch.float32).contiguous()) for n, t in out]


def encoded(name: str, tensor: torch.Tensor, dtype: str) -> tuple[np.ndarray, "gguf.GGMLQuantizationType"]:
    """The array to store and its GGML type: vectors and the router in f32, matrices in `dtype`."""
    Q = gguf.GGMLQuantizationType
    array = tensor.numpy()
    keep_f32 = tensor.dim() == 1 or ".ffn_gate_inp." in name
    if dtype == "f32" or keep_f32:
        return array, Q.F32
    if dtype == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return gguf.quants.quantize(array, Q.Q8_0), Q.Q8_0
    return array.astype(np.float16), Q.F16


def vocabulary(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for GGUF's "gpt2" tokenizer: our byte-level strings, `<|endoftext|>` as a
    control token, and unused "[PAD{i}]" tokens up to the model's vocab_size (rows no text ever produces)."""
    tokens, merges = tokenizer.bpe_vocabulary()
    types = [gguf.TokenType.CONTROL if i == tokenizer.eot_id else gguf.TokenType.NORMAL for i in range(len(tokens))]
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    return tokens, [int(t) for t in types], merges


FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}


def write_gguf(path: Path, model, tokenizer: Tokenizer, dtype: str, chat: ChatTemplate, name: str) -> None:
    config = model.config
    writer = gguf.GGUFWriter(path, ARCHITECTURE)
    writer.add_name(name)
    writer.add_description("gtransformer: a decoder-only language model trained on Portuguese books "
                           "(Project Gutenberg)")
    writer.add_license("mit")
    writer.add_languages(["pt"])
    writer.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[dtype]))
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.expert_hidden if config.n_experts else config.resolved_dense_hidden)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_key_length(config.resolved_head_dim)
    writer.add_value_length(config.resolved_head_dim)
    writer.add_rope_dimension_count(config.resolved_head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    if config.n_experts:
        writer.add_expert_count(config.n_experts)
        writer.add_expert_used_count(config.top_k)
    tokens, types, merges = vocabulary(tokenizer, config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.eot_id)
    writer.add_eos_token_id(tokenizer.eot_id)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat.to_jinja())
    for tensor_name, tensor in llama_tensors(model):
        array, qtype = encoded(tensor_name, tensor, dtype)
        writer.add_tensor(tensor_name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def modelfile(gguf_name: str, chat: ChatTemplate, config: ModelConfig, name: str) -> str:
    """An Ollama Modelfile for the GGUF file `gguf_name` beside it: the chat template, its stop strings and the
    sampling defaults of `gtransformer generate`.

    Ollama's parser keeps quoted values as written (no escapes), so a stop string that starts with a newline
    is a triple-quoted value spanning two lines."""
    stops = [*chat.stop, EOT]
    if any('"""' in text for text in [*stops, chat.to_go_template()]):
        raise UserError('the chat template contains """, which an Ollama Modelfile cannot quote; edit '
                        "chat_template.json in the run folder")
    lines = [
        f"# Ollama Modelfile for {name}, written by `gtransformer export --format gguf`:",
        f"#   ollama create {name} -f {gguf_name.removesuffix('.gguf')}.Modelfile",
        f'#   ollama run {name} "Quem foi Machado de Assis?"',
        "# The template is the run's chat dialogue; for plain continuation of a text, POST /api/generate with",
        '# "raw": true.',
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{chat.to_go_template()}"""',
        *(f'PARAMETER stop """{stop}"""' if "\n" in stop else f'PARAMETER stop "{stop}"' for stop in stops),
        "PARAMETER temperature 0.8",
        "PARAMETER top_k 50",
        "PARAMETER top_p 0.95",
        "PARAMETER repeat_penalty 1.1",
        f"PARAMETER num_ctx {config.context_length}",
        "",
    ]
    return "\n".join(lines)


def modelfile_path(out: Path) -> Path:
    return out.with_name(out.stem + ".Modelfile")


def export_gguf(model, tokenizer: Tokenizer, out: str | Path, dtype: str = "f32", force: bool = False,
                chat: ChatTemplate | None = None, name: str | None = None) -> tuple[Path, Path]:
    """Write `out` (GGUF) and the Ollama Modelfile beside it -> (gguf path, Modelfile path).

    Both are written to temporary files first and renamed at the end: a failed export leaves nothing behind,
    and existing files are replaced only with force=True."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r} is not a GGUF type; choose one of {', '.join(DTYPES)}")
    check_exportable(model, tokenizer)
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; a GGUF export is one file, e.g. --out {out / 'model.gguf'}")
    recipe = modelfile_path(out)
    existing = [str(p) for p in (out, recipe) if p.exists()]
    if existing and not force:
        raise UserError(f"{' and '.join(existing)} already exist{'s' if len(existing) == 1 else ''}; "
                        "pick another --out or pass --force")
    chat = chat or DEFAULT
    name = name or out.stem
    out.parent.mkdir(parents=True, exist_ok=True)
    temporaries = []
    try:
        for _ in range(2):
            handle, temporary = tempfile.mkstemp(prefix=f".{out.name}-", suffix=".partial", dir=out.parent)
            os.close(handle)
            temporaries.append(Path(temporary))
        write_gguf(temporaries[0], model, tokenizer, dtype, chat, name)
        with open(temporaries[1], "w", encoding="utf-8", newline="\n") as recipe_file:  # LF: see `modelfile`
            recipe_file.write(modelfile(out.name, chat, model.config, name))
        for temporary in temporaries:
            sync_path(temporary)
        os.replace(temporaries[0], out)
        os.replace(temporaries[1], recipe)
        sync_path(out.parent)
    finally:
        for temporary in temporaries:
            temporary.unlink(missing_ok=True)
    return out, recipe
