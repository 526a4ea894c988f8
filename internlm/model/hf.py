"""Hugging Face interchange: config mapping, weight names, and reading / writing HF model folders.

Export target: ``LlamaForCausalLM`` (``model_type`` "llama"), loadable by ``transformers`` with no remote code.
InternLM's decoder is Llama's with biases on q, k, v and o: Llama's ``attention_bias`` puts a bias on all four
projections (``q_proj``, ``k_proj``, ``v_proj`` and ``o_proj``), which is exactly ``qkvo_bias``.

Import accepts Llama configs and InternLM's published layout (``architectures: ["InternLMForCausalLM"]``,
``model_type`` "internlm", ``bias``, ``rotary: {"base", "type": "origin" | "dynamic", "scaling_factor"}``).

Weight names (both layouts use the same, under ``model.``):

    ours                                   Hugging Face
    embed_tokens.weight                    model.embed_tokens.weight
    layers.{i}.self_attn.{q,k,v,o}_proj.*  model.layers.{i}.self_attn.{q,k,v,o}_proj.*
    layers.{i}.mlp.{gate,up,down}_proj.*   model.layers.{i}.mlp.{gate,up,down}_proj.*
    layers.{i}.{input,post_attention}_layernorm.weight (likewise under model.)
    norm.weight                            model.norm.weight
    lm_head.weight                         lm_head.weight

Folders are read tensor by tensor (safetensors ``safe_open``, ``.bin`` files memory-mapped) and written shard by
shard (`write_hf_weights`), so neither direction holds the whole model twice.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

CONFIG_FILE = "config.json"
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_SINGLE = "pytorch_model.bin"
ARCHITECTURES = ("LlamaForCausalLM", "InternLMForCausalLM")
# buffers some published .bin files carry; recomputed by every implementation
_SKIPPED = re.compile(r".*rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------- config
def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def config_to_hf(config: Any, dtype: Optional[torch.dtype] = None, bos_id: int = 1, eos_id: int = 2) -> Dict[str, Any]:
    """The ``config.json`` of ``LlamaForCausalLM`` for an `InternLMConfig` (``dtype``: the weights' dtype when
    exported in another than ``config.dtype``)."""
    scaling = config.rope_scaling
    if scaling is not None:
        kind = scaling["type"]
        # "type" is what transformers < 4.45 reads, "rope_type" what later versions standardise it to
        scaling = {"type": kind, "rope_type": kind, "factor": float(scaling["factor"])}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": int(config.intermediate_size),
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_kv_attention_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": float(config.rope_base),
        "rope_scaling": scaling,
        "attention_bias": bool(config.qkvo_bias),  # q, k, v and o_proj
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "initializer_range": config.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": _dtype_name(dtype or config.dtype),
    }


def _read_config(dict_or_path: Union[str, os.PathLike, Mapping[str, Any]]) -> Tuple[Dict[str, Any], str]:
    if isinstance(dict_or_path, Mapping):
        return dict(dict_or_path), "the given config dict"
    path = os.fspath(dict_or_path)
    if os.path.isdir(path):
        path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: a Hugging Face model folder holds a {CONFIG_FILE}")
    with open(path) as f:
        return json.load(f), path


def _rope_from_hf(hf: Mapping[str, Any], where: str) -> Tuple[float, Optional[Dict[str, Any]]]:
    """``(rope_base, rope_scaling)`` from Llama's ``rope_theta`` + ``rope_scaling`` (or ``rope_parameters``) or
    InternLM's ``rotary`` dict."""
    base = float(hf.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters")
    rotary = hf.get("rotary")
    if isinstance(rotary, Mapping):  # InternLM: {"base": 10000, "type": "dynamic" | "origin", "scaling_factor": 1.0}
        base = float(rotary.get("base", base))
        kind = rotary.get("type", "origin")
        if kind == "dynamic":
            scaling = {"type": "dynamic", "factor": float(rotary.get("scaling_factor", 1.0))}
        elif kind != "origin":
            raise ValueError(f"{where}: rotary type {kind!r} is not supported (origin or dynamic)")
    if not scaling:
        return base, None
    base = float(scaling.get("rope_theta", base))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return base, None
    return base, {"type": kind, "factor": float(scaling.get("factor", 1.0))}  # the config checks the type


def config_values_from_hf(dict_or_path: Union[str, os.PathLike, Mapping[str, Any]]) -> Dict[str, Any]:
    """`InternLMConfig` field values of a Hugging Face ``config.json`` (a dict, the file, or its folder): Llama or
    InternLM (``InternLMConfig.from_hf`` builds the config; this module does not import it, which imports this).

    Raises ValueError naming the key when the model is not one this decoder can represent (another activation,
    MLP biases, a head size other than hidden / heads; a rope scaling type the config does not know is its error).
    """
    hf, where = _read_config(dict_or_path)
    arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in ARCHITECTURES and hf.get("model_type") not in ("llama", "internlm"):
        raise ValueError(f"{where}: architecture {arch!r} is not supported; use one of {', '.join(ARCHITECTURES)}")
    internlm_layout = arch == "InternLMForCausalLM" or hf.get("model_type") == "internlm"
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported (SwiGLU needs silu)")
    if hf.get("mlp_bias"):
        raise ValueError(f"{where}: mlp_bias=true is not supported (the MLP has no biases)")
    hidden, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    if hf.get("head_dim") not in (None, hidden // heads):
        raise ValueError(f"{where}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads = {hidden // heads}")
    # InternLM's config class defaults bias to True; Llama's attention_bias defaults to False
    bias = hf.get("bias", True) if internlm_layout else hf.get("attention_bias", False)
    base, scaling = _rope_from_hf(hf, where)
    values: Dict[str, Any] = dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        num_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_kv_attention_heads=int(hf.get("num_key_value_heads") or heads),
        max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
        rope_base=base,
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkvo_bias=bool(bias),
        init_std=float(hf.get("initializer_range", 0.02)),
        intermediate_size=int(hf["intermediate_size"]),
    )
    dtype = hf.get("torch_dtype") or hf.get("dtype")
    if dtype:
        values["dtype"] = str(dtype)
    if scaling is not None:
        values["rope_scaling"] = scaling
    return values


# ---------------------------------------------------------------------- weight names
def to_hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face (Llama / InternLM) one."""
    return name if name.startswith("lm_head.") else f"model.{name}"


def from_hf_name(name: str) -> Optional[str]:
    """A Hugging Face parameter name -> ours; None for buffers that are not weights (``rotary_emb.inv_freq``)."""
    if _SKIPPED.match(name):
        return None
    if name.startswith("model."):
        return name[len("model.") :]
    if name.startswith("lm_head."):
        return name
    raise KeyError(f"Hugging Face tensor {name!r} is not part of a Llama / InternLM causal LM")


# ---------------------------------------------------------------------- reading folders
def is_hf_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and bool(_weight_files(path, strict=False))


def _weight_files(folder: str, strict: bool = True) -> List[str]:
    """The weight files of an HF folder in index order: a sharded index (safetensors preferred), else the
    single file."""
    for index, single in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        index_path = os.path.join(folder, index)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            return list(dict.fromkeys(weight_map[k] for k in sorted(weight_map)))
        if os.path.isfile(os.path.join(folder, single)):
            return [single]
    if strict:
        raise FileNotFoundError(
            f"{folder}: no weights ({SAFE_SINGLE}, {SAFE_INDEX}, {BIN_SINGLE} or {BIN_INDEX}) next to {CONFIG_FILE}"
        )
    return []


def iter_hf_tensors(folder: str) -> Iterator[Tuple[str, torch.Tensor]]:
    """``(our name, tensor)`` of every weight of HF folder ``folder``, one file at a time (safetensors: one tensor
    read at a time; ``.bin``: memory-mapped). ``lm_head.weight`` comes from the embedding when the config ties
    them and the files hold no head."""
    tied = bool(_read_config(folder)[0].get("tie_word_embeddings"))
    seen = set()
    embed = None  # kept only when the head may have to be the embedding
    for file in _weight_files(folder):
        path = os.path.join(folder, file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{folder}: {file} (listed in its index) is missing")
        if file.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    name = from_hf_name(key)
                    if name is not None:
                        seen.add(name)
                        tensor = f.get_tensor(key)
                        embed = tensor if tied and name == "embed_tokens.weight" else embed
                        yield name, tensor
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
            for key, tensor in state.items():
                name = from_hf_name(key)
                if name is not None:
                    seen.add(name)
                    embed = tensor if tied and name == "embed_tokens.weight" else embed
                    yield name, tensor
            del state
    if "lm_head.weight" not in seen and embed is not None:
        yield "lm_head.weight", embed


# ---------------------------------------------------------------------- writing folders
def parse_size(text: Union[str, int]) -> int:
    """Bytes of ``"5GB"`` (10^9), ``"500MB"``, ``"2GiB"`` (2^30), ``"100KB"`` or a plain integer."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ValueError(f"size {text!r}: use a number with KB/MB/GB (10^3 steps) or KiB/MiB/GiB (2^10 steps)")
    unit = (match.group(2) or "B").upper()
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    step = 1024 if "I" in unit else 1000
    return int(float(match.group(1)) * step**power)


def plan_shards(sizes: Sequence[Tuple[str, int]], max_bytes: int) -> List[List[str]]:
    """Tensor names grouped into files of at most ``max_bytes`` each, in order (a larger tensor gets a file of its
    own), as ``transformers``' ``save_pretrained`` does."""
    shards: List[List[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_hf_weights(
    folder: str,
    sizes: Sequence[Tuple[str, int]],
    fetch: Callable[[str], torch.Tensor],
    max_shard_size: Union[str, int] = "5GB",
    dtype: Optional[torch.dtype] = None,
) -> List[str]:
    """Write tensors (``sizes``: our names with their byte counts in the output dtype) as safetensors files of at
    most ``max_shard_size``, fetching each with ``fetch(name)`` only while its file is written (one file in memory
    at a time); ``model.safetensors.index.json`` when there is more than one file. Returns the file names."""
    from safetensors.torch import save_file

    shards = plan_shards(sizes, parse_size(max_shard_size))
    files = (
        [SAFE_SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map: Dict[str, str] = {}
    for file, names in zip(files, shards):
        tensors = {}
        for name in names:
            tensor = fetch(name)
            tensor = tensor.to(dtype) if dtype is not None else tensor
            tensors[to_hf_name(name)] = tensor.contiguous()
            weight_map[to_hf_name(name)] = file
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        del tensors
    if len(files) > 1:
        index = {"metadata": {"total_size": sum(n for _, n in sizes)}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(folder, SAFE_INDEX), "w") as f:
            json.dump(index, f, indent=2)
    return files


def write_hf_config(folder: str, config: Any, dtype: Optional[torch.dtype] = None, **ids: int) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, CONFIG_FILE), "w") as f:
        json.dump(config_to_hf(config, dtype, **ids), f, indent=2)


def tokenizer_ids(model_path: str) -> Dict[str, int]:
    """``bos_id`` / ``eos_id`` of a SentencePiece model (for config.json)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    return {"bos_id": sp.bos_id(), "eos_id": sp.eos_id()}


def write_hf_tokenizer(model_path: str, folder: str) -> None:
    """A SentencePiece ``.model`` as a Hugging Face ``LlamaTokenizer`` (no remote code): ``tokenizer.model``,
    ``tokenizer_config.json`` and ``special_tokens_map.json``.

    No BOS is added (``add_bos_token`` false): training data here is ``encode(text) + [eos]`` per document, so
    ``AutoTokenizer(text).input_ids`` equals our ``Tokenizer.encode(text)``. ``add_prefix_space`` follows the
    model's own dummy-prefix setting (off for models trained here), and ``legacy`` is off.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=model_path)
    os.makedirs(folder, exist_ok=True)
    shutil.copyfile(model_path, os.path.join(folder, "tokenizer.model"))
    piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
    special = {"bos_token": piece(sp.bos_id()), "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id())}
    if sp.pad_id() >= 0:
        special["pad_token"] = piece(sp.pad_id())
    dummy_prefix = sp.encode("a", out_type=str)[0].startswith("\u2581")
    config = dict(
        tokenizer_class="LlamaTokenizer",
        add_bos_token=False,
        add_eos_token=False,
        add_prefix_space=dummy_prefix,
        legacy=False,
        clean_up_tokenization_spaces=False,
        sp_model_kwargs={},
        **special,
    )
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({k: v for k, v in special.items() if v is not None}, f, indent=2)


__all__ = [
    "config_values_from_hf",
    "config_to_hf",
    "from_hf_name",
    "is_hf_folder",
    "iter_hf_tensors",
    "parse_size",
    "plan_shards",
    "to_hf_name",
    "tokenizer_ids",
    "write_hf_config",
    "write_hf_tokenizer",
    "write_hf_weights",
]
