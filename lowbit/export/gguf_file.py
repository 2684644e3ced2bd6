"""GGUF export (llama.cpp): a run's linears in llama.cpp's block types, written with the gguf package.

Target `gguf` writes each linear in the GGUF type the run solved it on (recipe `weights: {format: gguf,
type: q4_k}` or a mix such as q4_k_m): codes, sub-block scales and mins are the run's own, packed as ggml
stores them (lowbit.export.gguf_blocks), so llama.cpp runs exactly the simulated weights. Targets
`gguf-q8_0` / `gguf-q4_0` take ordinary integer runs: a symmetric run of the same bit width whose groups are
whole multiples of 32 (or per channel) maps exactly (the run's codes, its scales in fp16); any other grid
is re-fit by llama.cpp's reference quantizer (gguf.quants) to our dequantized weights, and the export says
so. Architecture, tensor names and the q/k row order come from the model's adapter; the tokenizer keys
follow llama.cpp's converter, so both llama.cpp and transformers' GGUF loader read the file.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.export.base import LoadedRun, register_exporter, stored_scale
from lowbit.export.gguf_blocks import pack
from lowbit.formats import QuantSpec
from lowbit.gguf_types import TYPES
from lowbit.models.registry import get_adapter

BLOCK = 32
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
    if kinds == [("Split", None, None), ("ByteLevel", None, False)] and \
            steps[0].get("pattern", {}).get("Regex") == _QWEN2_SPLIT:
        return "qwen2"
    raise LowbitError(f"the tokenizer's pre-tokenizer {[k[0] for k in kinds]} has no known llama.cpp name; GGUF "
                      f"export supports byte-level BPE tokenizers (gpt-2, smollm, qwen2)")


# the word split of Qwen2's tokenizer (llama.cpp's pre-tokenizer "qwen2")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


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
    if getattr(config, "mlp_bias", False):
        raise LowbitError("models with biased MLP linears are not supported by the GGUF export")
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


def solved_tensor(name: str, linear: nn.Linear, run: LoadedRun, row_order: torch.Tensor | None) -> tuple[np.ndarray, str]:
    """A linear solved on a GGUF type: its codes and parameters packed in that type (checked, see `pack`)."""
    rec = run.state.weights[name]
    if rec.spec.gguf not in TYPES:
        raise LowbitError(f"{name} was quantized as {rec.spec.describe()}, not on a GGUF type: export it with "
                          f"--format gguf-q4_0 / gguf-q8_0, or rerun with weights: {{format: gguf, type: ...}}")
    gtype = TYPES[rec.spec.gguf]
    codes = rec.codes(linear.weight.detach().float(), name)
    rows = codes.shape[0]
    scale, zero = rec.scale.reshape(rows, -1), rec.zero.reshape(rows, -1)
    if row_order is not None:
        codes, scale, zero = codes[row_order], scale[row_order], zero[row_order]
    return pack(codes, scale, zero, gtype, name), gtype.name


def _describe_types(kinds: dict[tuple[str, int], int]) -> str:
    """'Q4_K x 30 (rows of 1536), Q5_0 x 180 (rows of 576: llama.cpp's fallback, rows not a multiple of 256)'."""
    parts = []
    for (qtype, width), n in sorted(kinds.items()):
        fallback = any(t.fallback == qtype.lower() for t in TYPES.values()) and width % 256 and any(
            TYPES[k.lower()].scale_bits for k, _ in kinds)
        why = ": the K-quant fallback, rows not a multiple of 256" if fallback else ""
        parts.append(f"{qtype} x {n} (rows of {width}{why})")
    return ", ".join(parts)


# (module name, linear, GGUF row order or None) -> (GGUF blocks, type name, carries the run's codes exactly),
# or None to store the weight unquantized
Encoder = Callable[[str, nn.Linear, "torch.Tensor | None"], "tuple[np.ndarray, str, bool] | None"]


@dataclass
class Written:
    """What `write_model` stored: linears per (type, row length), how many exactly, which re-fit, which kept float."""

    kinds: dict[tuple[str, int], int] = field(default_factory=dict)
    exact: int = 0
    refit: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)


def write_model(model: nn.Module, tokenizer, path: Path, name: str, encode: Encoder, float_dtype: str,
                metadata: dict[str, str] | None = None) -> Written:
    """Write a model as GGUF: hyperparameters, tokenizer, `metadata` as lowbit.* strings, each linear as `encode`
    packs it, the rest in float."""
    import gguf

    config = model.config
    adapter = get_adapter(model)
    arch = adapter.gguf_arch(config.model_type)
    writer = gguf.GGUFWriter(str(path), arch)
    add_hparams(writer, config, name)
    add_tokenizer(writer, tokenizer, config.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in (metadata or {}).items():
        writer.add_string(f"lowbit.{key}", value)
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    permute = arch in adapter.gguf_interleaved_rope
    out = Written()
    for pname, param in model.named_parameters():
        if pname == f"{adapter.head_path}.weight" and config.tie_word_embeddings:
            continue
        module_name, kind = pname.rsplit(".", 1)
        tname = adapter.gguf_tensor_name(pname)
        short = tname.split(".")[-2]
        order = rope_row_order(param.shape[0], heads[short]) if permute and short in heads else None
        encoded = encode(module_name, model.get_submodule(module_name), order) if kind == "weight" else None
        if encoded is not None:
            blocks, qtype, is_exact = encoded
            writer.add_tensor(tname, blocks, raw_dtype=gguf.GGMLQuantizationType[qtype])
            out.kinds[(qtype, param.shape[1])] = out.kinds.get((qtype, param.shape[1]), 0) + 1
            out.exact += is_exact
            if not is_exact:
                out.refit.append(module_name)
            continue
        data = param.detach().float()
        if order is not None:
            data = data[order]
        if data.dim() > 1:
            out.kept.append(tname)
        keep_f32 = data.dim() == 1 or float_dtype == "float32"
        writer.add_tensor(tname, data.numpy().astype(np.float32 if keep_f32 else np.float16))
    types = {k for k, _ in out.kinds}  # general.file_type where one name says it (mixes have none of their own)
    file_type = (gguf.LlamaFileType.__members__.get(f"MOSTLY_{types.pop()}") if len(types) == 1 else
                 None if types else gguf.LlamaFileType.ALL_F32 if float_dtype == "float32" else gguf.LlamaFileType.MOSTLY_F16)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def write_gguf(run: LoadedRun, path: Path, qtype_name: str | None, bits: int | None) -> list[str]:
    """Write the run as GGUF: in `qtype_name` (Q8_0/Q4_0, re-fit where off-grid), or None: each linear in its solved type."""
    import gguf

    def encode(module_name: str, linear: nn.Linear, order):
        if run.schemes.get(module_name) is None:
            return None
        if qtype_name is None:
            return (*solved_tensor(module_name, linear, run, order), True)
        blocks, is_exact = quantized_tensor(module_name, linear, run, gguf.GGMLQuantizationType[qtype_name], bits, order)
        return blocks, qtype_name, is_exact

    metadata = {k: v for k, v in run.provenance.items() if v is not None}
    out = write_model(run.model, run.tokenizer, path, run.run_dir.name, encode, run.dtype, metadata)
    scales = "fp16 block scales" if qtype_name else "its block scales and mins"
    notes = [f"{out.exact} linears carry the run's codes exactly ({scales}): {_describe_types(out.kinds)}"]
    if out.refit:
        spec = run.state.weights[out.refit[0]].spec.describe()
        notes.append(f"{len(out.refit)} linears ({spec}) are not on the {qtype_name} grid and were RE-FIT to the run's "
                     f"dequantized weights with llama.cpp's reference quantizer: the export is not exactly the run")
    if out.kept:
        dtype = "F32" if run.dtype == "float32" else "F16"
        notes.append(f"{len(out.kept)} matrices not quantized in the run are stored in {dtype} "
                     f"({', '.join(out.kept[:3])})")
    return notes


@register_exporter("gguf", suffix=".gguf")
def write_solved(run: LoadedRun, path: Path) -> list[str]:
    return write_gguf(run, path, None, None)


@register_exporter("gguf-q8_0", suffix=".gguf")
def write_q8_0(run: LoadedRun, path: Path) -> list[str]:
    return write_gguf(run, path, "Q8_0", 8)


@register_exporter("gguf-q4_0", suffix=".gguf")
def write_q4_0(run: LoadedRun, path: Path) -> list[str]:
    return write_gguf(run, path, "Q4_0", 4)


def load_gguf(path: Path) -> nn.Module:
    """Load a GGUF export with transformers' GGUF loader (weights dequantized to float32)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32,
                                                 trust_remote_code=False)
    return model.eval()
