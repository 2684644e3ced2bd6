"""GGUF export (llama.cpp) of Llama-family runs: Q8_0 and Q4_0 written with the gguf package.

GGUF quantizes rows in blocks of 32 with one fp16 scale d per block: Q8_0 stores x = d * q (q int8),
Q4_0 stores x = d * (q - 8) (q in 0..15). A run with symmetric codes of the same bit width whose groups
are whole multiples of 32 (or per channel) maps exactly: the run's codes, d = its scale in fp16. Any
other grid (asymmetric, groups of 16, ...) is re-fit by llama.cpp's reference quantizer (gguf.quants) to
our dequantized weights, and the export says so. Tensor names, the q/k row order and the tokenizer keys
follow llama.cpp's converter, so both llama.cpp and transformers' GGUF loader read the file. Target `gguf`
writes each linear in its own type (4-bit runs Q4_0, 8-bit Q8_0): mixed precision, one type per tensor.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.base import LoadedRun, register_exporter, stored_scale
from lowbit.formats import QuantSpec

BLOCK = 32
_BLOCK_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
_MODEL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def gguf_name(name: str) -> str:
    """llama.cpp's tensor name for a transformers Llama parameter name."""
    if name in _MODEL_NAMES:
        return _MODEL_NAMES[name]
    parts = name.split(".")  # model.layers.{i}.{rel...}.weight
    rel = ".".join(parts[3:-1])
    if parts[:2] != ["model", "layers"] or rel not in _BLOCK_NAMES:
        raise LowbitError(f"parameter {name} has no GGUF counterpart for the llama architecture")
    return f"blk.{parts[2]}.{_BLOCK_NAMES[rel]}.{parts[-1]}"


def rope_row_order(rows: int, n_heads: int) -> torch.Tensor:
    """Row permutation llama.cpp applies to q/k: each head's two rotary halves interleaved pairwise."""
    half = rows // n_heads // 2
    return torch.arange(rows).reshape(n_heads, 2, half).transpose(1, 2).reshape(-1)


def exact_grid(spec: QuantSpec, bits: int) -> bool:
    """Whether the run's grid is the GGUF block grid (or coarser): symmetric, same bits, groups of 32k."""
    return (spec.format == "int" and spec.bits == bits and spec.symmetric
            and (spec.granularity == "channel" or (spec.granularity == "group" and spec.group_size % BLOCK == 0)))


def pack_blocks(codes: torch.Tensor, d: torch.Tensor, qtype) -> np.ndarray:
    """GGUF blocks [rows, bytes] from signed codes [rows, cols] and per-block fp16-representable scales [rows, cols/32]."""
    import gguf

    rows, cols = codes.shape
    d16 = d.numpy().astype(np.float16).reshape(rows, cols // BLOCK, 1).view(np.uint8)
    q = codes.to(torch.int16).numpy().reshape(rows, cols // BLOCK, BLOCK)
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        payload = q.astype(np.int8).view(np.uint8)
    else:
        u = (q + 8).astype(np.uint8)
        payload = u[..., :16] | (u[..., 16:] << 4)
    return np.concatenate([d16, payload], axis=-1).reshape(rows, -1)


def _block_scales(rec, rows: int, cols: int) -> torch.Tensor:
    scale = stored_scale(rec.scale, torch.float16, "GGUF block scales").reshape(rows, -1)
    return scale.repeat_interleave(cols // BLOCK // scale.shape[1], dim=1)


def quantized_tensor(name: str, linear: nn.Linear, run: LoadedRun, qtype, bits: int,
                     row_order: torch.Tensor | None) -> tuple[np.ndarray, bool]:
    """A linear's weight as GGUF blocks; True if it carries the run's codes exactly, False if re-fit."""
    import gguf

    w = linear.weight.detach().float()
    rows, cols = w.shape
    if cols % BLOCK:
        raise LowbitError(f"{name} has {cols} input features, not a multiple of GGUF's block of {BLOCK}")
    rec = run.state.weights[name]
    if not exact_grid(rec.spec, bits):
        w = w if row_order is None else w[row_order]
        return gguf.quants.quantize(w.numpy(), qtype), False
    codes = rec.codes(w, name)
    d = _block_scales(rec, rows, cols)
    if row_order is not None:
        codes, d = codes[row_order], d[row_order]
    return pack_blocks(codes, d, qtype), True


def _pre_tokenizer(tok_json: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization, recognised from its structure."""
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [(s.get("type"), s.get("individual_digits"), s.get("use_regex")) for s in steps]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    raise LowbitError(f"the tokenizer's pre-tokenizer {[k[0] for k in kinds]} has no known llama.cpp name; GGUF "
                      f"export supports byte-level BPE tokenizers (gpt-2, smollm)")


def add_tokenizer(writer, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE vocabulary, merges and special ids, as llama.cpp's converter writes a 'gpt2' tokenizer."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    tok_json = json.loads(backend.to_str()) if backend is not None else {}
    if tok_json.get("model", {}).get("type") != "BPE":
        raise LowbitError("GGUF export needs a fast byte-level BPE tokenizer (tokenizer.json with a BPE model)")
    vocab = tokenizer.get_vocab()
    if len(vocab) > vocab_size:
        raise LowbitError(f"the tokenizer has {len(vocab)} tokens but the embedding only {vocab_size} rows")
    by_id = {i: t for t, i in vocab.items()}
    special = set(tokenizer.all_special_ids)
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(tok)
            types.append(gguf.TokenType.CONTROL if i in special or added.get(tok)
                         else gguf.TokenType.USER_DEFINED if tok in added else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tok_json))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        if getattr(tokenizer, attr, None) is not None:
            add(getattr(tokenizer, attr))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def add_hparams(writer, config, name: str) -> None:
    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default", "rope_theta": config.rope_theta}
    if rope.get("rope_type", "default") != "default":
        raise LowbitError(f"rope scaling {rope.get('rope_type')!r} is not supported by the GGUF export")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise LowbitError("Llama models with biased linears are not supported by the GGUF export")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_vocab_size(config.vocab_size)


def write_gguf(run: LoadedRun, path: Path) -> list[str]:
    """Each quantized linear in its scheme's GGUF type (Q4_0 or Q8_0: one type per tensor, so mixed runs map)."""
    import gguf

    types = Counter(s.name for s in run.schemes.values() if s is not None)
    qtype_name = "+".join(sorted(types)) if len(types) > 1 else next(iter(types))
    model, config = run.model, run.model.config
    if config.model_type != "llama":
        raise LowbitError(f"GGUF export supports the llama architecture, not {config.model_type!r}; "
                          f"use --format compressed-tensors")
    writer = gguf.GGUFWriter(str(path), "llama")
    add_hparams(writer, config, run.run_dir.name)
    writer.add_file_type(gguf.LlamaFileType[f"MOSTLY_{types.most_common(1)[0][0]}"])
    add_tokenizer(writer, run.tokenizer, config.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in run.provenance.items():
        if value is not None:
            writer.add_string(f"lowbit.{key}", value)
    heads = {"self_attn.q_proj": config.num_attention_heads, "self_attn.k_proj": config.num_key_value_heads}
    exact, refit, kept = 0, [], []
    for pname, param in model.named_parameters():
        if pname == "lm_head.weight" and config.tie_word_embeddings:
            continue
        module_name = pname.rsplit(".", 1)[0]
        rel = ".".join(module_name.split(".")[3:])
        scheme = run.schemes.get(module_name)
        if scheme is not None:
            qtype, bits = gguf.GGMLQuantizationType[scheme.name], int(scheme.weights[0][3:])
            order = rope_row_order(param.shape[0], heads[rel]) if rel in heads else None
            blocks, is_exact = quantized_tensor(module_name, model.get_submodule(module_name), run, qtype, bits, order)
            writer.add_tensor(gguf_name(pname), blocks, raw_dtype=qtype)
            exact += is_exact
            if not is_exact:
                refit.append(module_name)
            continue
        data = param.detach().float()
        if rel in heads:
            data = data[rope_row_order(data.shape[0], heads[rel])]
        if data.dim() > 1:
            kept.append(gguf_name(pname))
        keep_f32 = data.dim() == 1 or run.dtype == "float32"
        writer.add_tensor(gguf_name(pname), data.numpy().astype(np.float32 if keep_f32 else np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    notes = [f"{qtype_name}: {exact} linears carry the run's codes exactly (fp16 block scales)"]
    if refit:
        spec = run.state.weights[refit[0]].spec.describe()
        notes.append(f"{len(refit)} linears ({spec}) are not on the {qtype_name} grid and were RE-FIT to the run's "
                     f"dequantized weights with llama.cpp's reference quantizer: the export is not exactly the run")
    if kept:
        dtype = "F32" if run.dtype == "float32" else "F16"
        notes.append(f"{len(kept)} matrices not quantized in the run are stored in {dtype} ({', '.join(kept[:3])})")
    return notes


for _target in ("gguf-q8_0", "gguf-q4_0", "gguf"):
    register_exporter(_target, suffix=".gguf")(write_gguf)


def load_gguf(path: Path) -> nn.Module:
    """Load a GGUF export with transformers' GGUF loader (weights dequantized to float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()
