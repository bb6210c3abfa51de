"""Load Hugging Face transformers models (causal LMs and encoders) with checked inputs.

Everything that can be checked from the folder alone is checked before transformers loads the
weights, so a bad folder fails with one line naming the file or tensor instead of a long
traceback or, worse, a silently re-initialized model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.io.header import model_tensor_infos

# Architectures whose class name ends like this are loaded with AutoModelForCausalLM.
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
# Encoder families loaded with AutoModel when config.json names no architecture.
_ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "deberta",
                  "deberta-v2", "albert", "camembert", "nomic_bert", "modernbert")

KINDS = ("causal-lm", "encoder")


def model_kind(config: Any) -> str:
    """'causal-lm' or 'encoder' for a transformers config (from its architectures/model type)."""
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith(_CAUSAL_SUFFIXES) for a in archs):
        return "causal-lm"
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"model type {config.model_type!r} is an encoder-decoder; lowbit loads causal LMs "
            "and encoders"
        )
    if archs or config.model_type in _ENCODER_TYPES:
        return "encoder"
    return "causal-lm"


def auto_class(kind: str) -> Any:
    """The transformers Auto class that builds a model of ``kind``."""
    from transformers import AutoModel, AutoModelForCausalLM

    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}; allowed: {', '.join(KINDS)}")
    return AutoModelForCausalLM if kind == "causal-lm" else AutoModel


def build_on_meta(config: Any, kind: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The model of ``config`` with every parameter and buffer on the meta device (no memory).

    Float tensors get ``dtype`` (not config.json's ``dtype``, which records the checkpoint's).
    """
    with torch.device("meta"):
        return auto_class(kind).from_config(config, dtype=dtype)


def _looks_like_path(text: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a local path.
    return text.startswith(("/", ".", "~")) or text.count("/") > 1


def _is_offline() -> bool:
    """HF_HUB_OFFLINE is set, or the hub endpoint does not answer within a few seconds.

    Probing first avoids huggingface_hub's retry loop (tens of seconds of warnings) offline.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return True
    import socket
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=3).close()
    except OSError:
        return True
    return False


def _offline_error(name: str) -> ValueError:
    return ValueError(
        f"model {name!r} is not a local folder and could not be fetched (offline); pass a local "
        "Hugging Face model folder"
    )


def check_weights_match_config(model_dir: Path, config: Any, kind: str) -> None:
    """Validate the safetensors files of ``model_dir`` (present, complete) against ``config``.

    Raises ValueError naming the first tensor whose shape differs from what the config builds.
    """
    infos = model_tensor_infos(model_dir)
    model = build_on_meta(config, kind)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    prefix = getattr(model, "base_model_prefix", "") or ""
    for info in infos:
        name = info.name
        candidates = [name]
        if prefix and name.startswith(prefix + "."):
            candidates.append(name[len(prefix) + 1 :])
        elif prefix:
            candidates.append(f"{prefix}.{name}")
        for key in candidates:
            if key in expected and expected[key] != info.shape:
                raise ValueError(
                    f"{model_dir}: tensor {name!r} in {info.file} has shape {list(info.shape)} "
                    f"but config.json builds {list(expected[key])}; the config does not match "
                    "the weights"
                )


def load_hf_model(
    path_or_id: str | os.PathLike, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any, str]:
    """Load a transformers model folder (or hub id) in ``dtype``, in eval mode.

    Returns ``(model, tokenizer or None, kind)`` with kind 'causal-lm' (AutoModelForCausalLM:
    Llama, GPT-2, ...) or 'encoder' (AutoModel: BERT family). fp16/bf16 checkpoints are loaded
    in float32 by default (half-precision matmuls are slow on CPUs without native support).
    A folder model remembers its source as ``model._lowbit_source`` (``lowbit.save`` copies the
    tokenizer and other non-weight files from it).
    """
    from transformers import AutoConfig

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    text = os.fspath(path_or_id)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"MODEL_DIR {text!r} is a file; a Hugging Face model folder (config.json + "
                "*.safetensors) is expected"
            )
        if not (path / "config.json").is_file():
            raise ValueError(
                f"MODEL_DIR {text!r} has no config.json; a Hugging Face model folder "
                "(config.json + *.safetensors) is expected"
            )
        source: str | Path = path
    elif _looks_like_path(text):
        raise ValueError(
            f"MODEL_DIR {text!r} does not exist; a Hugging Face model folder is expected"
        )
    else:
        if _is_offline():
            raise _offline_error(text)
        source = text
    try:
        config = AutoConfig.from_pretrained(source)
    except OSError as e:
        if isinstance(source, str):
            raise _offline_error(text) from None
        raise ValueError(f"MODEL_DIR {text!r}: config.json could not be read: {e}") from None
    except Exception as e:  # ValueError, or transformers' strict config validation
        raise ValueError(f"MODEL_DIR {text!r}: {str(e).splitlines()[0]}") from None
    kind = model_kind(config)
    stored = getattr(config, "dtype", None)  # the checkpoint's float dtype (Hub ids too),
    if isinstance(source, Path):              # before building on it sets config.dtype
        check_weights_match_config(source, config, kind)
        stored = stored_float_dtype(source) or stored  # the tensors, where they are read
    try:
        model, info = auto_class(kind).from_pretrained(
            source, dtype=dtype, output_loading_info=True
        )
    except OSError as e:
        if isinstance(source, str):
            raise _offline_error(text) from None
        raise ValueError(f"MODEL_DIR {text!r}: {str(e).splitlines()[0]}") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing and all(k.startswith("pooler.") for k in missing) and getattr(
            model, "pooler", None) is not None:
        # an encoder saved from *ForMaskedLM (roberta-base style) has no pooler weights; mean
        # pooling never uses the pooler, so it is dropped rather than randomly initialized
        model.pooler = None
        missing = []
    if missing:
        raise ValueError(
            f"MODEL_DIR {text!r}: weights missing for {len(missing)} tensors (first: "
            f"{missing[0]!r}); they would be randomly initialized"
        )
    model.eval()
    if isinstance(source, Path):
        model._lowbit_source = str(source.resolve())
    if stored in (torch.float16, torch.bfloat16):
        model._lowbit_stored_dtype = stored
    return model, load_tokenizer(source), kind


def load_tokenizer(source: str | Path) -> Any:
    """The folder's tokenizer, or None when it has none."""
    from transformers import AutoTokenizer

    if isinstance(source, Path) and not any(
        (source / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
    ):
        return None
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError):
        return None


def stored_float_dtype(folder: Path) -> torch.dtype | None:
    """The dtype most float values of the folder's safetensors files are stored in (read from
    their headers); None without float tensors or safetensors files."""
    from lowbit.io.header import read_safetensors_header

    counts: dict[str, int] = {}
    for file in sorted(folder.glob("*.safetensors")):
        try:
            for t in read_safetensors_header(file):
                if t.dtype in ("F16", "BF16", "F32", "F64"):
                    counts[t.dtype] = counts.get(t.dtype, 0) + t.numel
        except (OSError, ValueError):
            return None
    if not counts:
        return None
    # the dtype of most float values: a norm or a router kept in F32 does not make it F32
    most = max(counts, key=counts.__getitem__)
    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
            "F64": torch.float64}[most]


def source_float_dtype(model_dir: str | os.PathLike, model: nn.Module | None = None
                       ) -> torch.dtype | None:
    """float16 / bfloat16 when the source checkpoint's float tensors are stored in it (as
    :func:`load_hf_model` recorded on ``model``, or a model folder's safetensors headers, or
    without them its config.json ``dtype`` / older ``torch_dtype``), else None. The CLI stores
    the float tensors of a quantized model loaded in float32 back in that dtype, so the
    checkpoint is not larger than its source."""
    import json

    recorded = getattr(model, "_lowbit_stored_dtype", None)
    if recorded is not None:
        return recorded
    folder = Path(model_dir).expanduser()
    found = stored_float_dtype(folder) if folder.is_dir() else None
    if found is not None:  # the tensors say it, whatever config.json says
        return found if found in (torch.float16, torch.bfloat16) else None
    try:
        config = json.loads((Path(model_dir).expanduser() / "config.json").read_text(
            encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = (config.get("dtype") or config.get("torch_dtype")) if isinstance(config, dict) else None
    if not isinstance(name, str):
        return None
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(name)
