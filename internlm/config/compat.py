"""InternLM compatibility keys: accepted where their value means what this framework does, else rejected.

Every key of InternLM's own configs either works as it does there or is rejected at start-up with one line
naming what to use instead (docs/internlm_compat.md has the key-by-key table). The single-key checks below are
the ``normalize`` functions of their keys (`internlm.config.sections`, ``compat=EQUIVALENT``); the
checks that need another key are in `check_compat`, called from `internlm.config.validate.validate`.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping

from .errors import ConfigError

LOAD_CONTENT = ("model", "optimizer", "scheduler", "sampler")
CKPT_TYPES = ("internlm", "hf")


def pack_sample_into_one(value: bool) -> bool:
    if value:
        raise ValueError(
            "True is not supported: documents are always packed with their boundaries kept (attention and "
            "positions restart at every document, InternLM's False); set False"
        )
    return value


def rampup_batch_size(value: str) -> str:
    if value.strip():
        raise ValueError(
            f"{value!r}: batch-size ramp-up is not supported; set '' and run one phase config per batch size "
            "(data.micro_num / micro_bsz per phase, docs/phases.md)"
        )
    return value


def min_length(value: int) -> int:
    if value > 0:
        raise ValueError(
            f"{value}: documents are not filtered by length at training time; set 0 and drop documents shorter "
            f"than {value} tokens when converting: python tools/convert_internlm_data.py SRC DST --min-length {value}"
        )
    return value


def data_type(value: str) -> str:
    if value not in ("tokenized", "streaming"):
        raise ValueError(
            f"{value!r} is not supported; use 'tokenized' (tokenize with tools/tokenizer.py, or convert InternLM's "
            "tokenized .bin files with tools/convert_internlm_data.py) or 'streaming' (raw jsonl/txt/parquet files "
            "tokenized while training with data.tokenizer_path, docs/data.md)"
        )
    return value


def tensor_sp(value: str) -> str:
    if value not in ("none", "megatron"):
        raise ValueError(
            f"{value!r} is not supported; use 'megatron' (or parallel.sequence_parallel=True: Megatron-style sequence "
            "parallelism) or 'none'"
        )
    return value


def async_upload(value: bool) -> bool:
    if value:
        raise ValueError(
            "True is not supported (it uploads to object storage); set False and use ckpt.async_save=True for "
            "background checkpoint writes"
        )
    return value


_ALERT_KEYS = ("enable_feishu_alert", "feishu_alert_address", "light_monitor_address")


def _webhook_url(name: str, address: str) -> str:
    """``address`` as an http(s) URL: InternLM's light_monitor_address is ``host:port``, taken as http://."""
    url = address if "://" in address else f"http://{address}"
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"{name}={address!r}: only http:// and https:// webhooks are supported")
    return url


def alert_webhooks(value: Mapping[str, Any]) -> List[str]:
    """The URLs alerts are POSTed to (internlm.train.alerts): feishu_alert_address when enable_feishu_alert is
    true, and light_monitor_address when set."""
    webhooks = []
    if value.get("enable_feishu_alert") and value.get("feishu_alert_address"):
        webhooks.append(_webhook_url("feishu_alert_address", str(value["feishu_alert_address"])))
    if value.get("light_monitor_address"):
        webhooks.append(_webhook_url("light_monitor_address", str(value["light_monitor_address"])))
    return webhooks


def alert(value: Mapping[str, Any]) -> Dict[str, Any]:
    """InternLM's alert keys, checked (unknown keys, addresses that are not http(s) URLs or host:port)."""
    unknown = sorted(set(value) - set(_ALERT_KEYS))
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise ValueError(f"unknown key(s) {names}; InternLM's keys are {', '.join(_ALERT_KEYS)}")
    alert_webhooks(value)
    return dict(value)


def load_ckpt_info(value: Mapping[str, Any]) -> Dict[str, Any]:
    """InternLM's ``dict(path=..., content=(...), ckpt_type=...)``, checked; ``content`` is returned as the sorted
    tuple of what to load ("all" expanded), ``ckpt_type`` "normal" (InternLM's older name) as "internlm", and a
    ``local:`` path prefix dropped."""
    unknown = sorted(set(value) - {"path", "content", "ckpt_type"})
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise ValueError(f"unknown key(s) {names}; use dict(path=..., content=(...), ckpt_type=...)")
    path = value.get("path")
    if path is not None and not isinstance(path, str):
        raise ValueError(f"path must be a folder name (str) or None, got {path!r}")
    if isinstance(path, str) and ":" in path.split("/")[0]:
        scheme, _, rest = path.partition(":")
        if scheme != "local":
            raise ValueError(f"storage scheme {scheme!r} is not supported; use a local path (optionally 'local:path')")
        path = rest
    content = value.get("content", ("all",))
    if isinstance(content, str) or not isinstance(content, (tuple, list)) or not content:
        raise ValueError(f"content must be a tuple such as ('model',) or ('all',), got {content!r}")
    wrong = [c for c in content if c not in LOAD_CONTENT + ("all",)]
    if wrong:
        raise ValueError(f"content {wrong[0]!r} is not one of {', '.join(map(repr, LOAD_CONTENT + ('all',)))}")
    wanted = set(LOAD_CONTENT) if "all" in content else set(content)
    if "model" not in wanted:
        raise ValueError(
            f"content {tuple(content)!r} lacks 'model'; use ('model',), ('model', 'optimizer', ...) or ('all',)"
        )
    ckpt_type = value.get("ckpt_type", "internlm")
    ckpt_type = "internlm" if ckpt_type == "normal" else ckpt_type
    if ckpt_type not in CKPT_TYPES:
        raise ValueError(f"ckpt_type {ckpt_type!r} is not supported; use 'internlm' (our checkpoints) or 'hf'")
    if ckpt_type == "hf" and wanted != {"model"}:
        raise ValueError("a Hugging Face folder holds only weights: use content=('model',) with ckpt_type='hf'")
    return dict(path=path, content=tuple(c for c in LOAD_CONTENT if c in wanted), ckpt_type=ckpt_type)


def check_compat(cfg: Mapping[str, Any]) -> None:
    """Raise ConfigError for an InternLM compatibility value whose meaning depends on another key, and for a
    grad_scaler section that InternLM's DynamicGradScaler would refuse."""
    scaler = cfg["grad_scaler"]
    initial, low, high = scaler["fp16"]["initial_scale"], scaler["fp16"]["min_scale"], scaler["max_scale"]
    if not 0 < low <= initial <= high:
        raise ConfigError(
            "grad_scaler.fp16.initial_scale",
            f"needs 0 < grad_scaler.fp16.min_scale ({low:g}) <= initial_scale ({initial:g}) <= grad_scaler.max_scale "
            f"({high:g})",
        )
    if scaler["growth_factor"] <= 1 or not 0 < scaler["backoff_factor"] < 1:
        raise ConfigError(
            "grad_scaler.growth_factor",
            f"needs growth_factor > 1 and 0 < backoff_factor < 1, got {scaler['growth_factor']:g} and "
            f"{scaler['backoff_factor']:g}",
        )
    ckpt = cfg["ckpt"]
    freq = ckpt["oss_snapshot_freq"]
    # InternLM saves a snapshot checkpoint every oss_snapshot_freq steps when it is > 1; a snapshot step that is
    # also a checkpoint_every step is saved as a normal checkpoint, so multiples of checkpoint_every change nothing
    if freq is not None and freq > 1 and (not float(freq).is_integer() or int(freq) % ckpt["checkpoint_every"]):
        raise ConfigError(
            "ckpt.oss_snapshot_freq",
            f"{freq!r}: snapshot checkpoints are not supported; save more often with ckpt.checkpoint_every={int(freq)} "
            "(ckpt.keep_last bounds the disk use) and remove oss_snapshot_freq",
        )


__all__ = [
    "LOAD_CONTENT",
    "CKPT_TYPES",
    "pack_sample_into_one",
    "rampup_batch_size",
    "min_length",
    "data_type",
    "tensor_sp",
    "async_upload",
    "alert",
    "alert_webhooks",
    "load_ckpt_info",
    "check_compat",
]
