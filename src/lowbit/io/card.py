"""The model card (README.md) ``lowbit.save`` writes beside a quantized checkpoint.

Hugging Face shows a folder's README.md as its model card; the float model's card describes
float weights and their results, so a quantized checkpoint gets its own: front matter naming the
base model (``base_model_relation: quantized``, as the Hub expects of quantized repos), what was
quantized with which spec, the bytes before and after, how to load it, lowbit's notes, and the
original card below.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

_FRONT_MATTER = re.compile(r"\A---\s*\n(.*?)\n---\s*(?:\n|\Z)", re.DOTALL)
_ORIGINAL_NOTE = "(The float model's card, as it was; its results are for float weights.)"
# Keys of the original card's front matter that still hold for the quantized model.
# The line of lowbit's own card naming the float model (group 1: its name, if it had one).
_LOWBIT_ORIGIN = re.compile(r"^This is (?:`([^`]+)`|a float model) with its weights quantized "
                            r"by lowbit", re.MULTILINE)
_KEPT_KEYS = ("license", "license_name", "license_link", "language", "datasets",
              "pipeline_tag", "library_name")


def _split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """``(front matter as a dict, body)`` of a model card; ``({}, text)`` without valid YAML."""
    text = text.removeprefix("\ufeff")  # a byte-order mark before the front matter
    match = _FRONT_MATTER.match(text)
    if match is None:
        return {}, text
    try:
        import yaml

        meta = yaml.safe_load(match.group(1))
    except Exception:  # no PyYAML, or YAML it cannot read: keep the card as it is
        return {}, text
    if not isinstance(meta, dict):  # text between two rules, not front matter
        return {}, text
    return meta, text[match.end():]


def model_card(
    out_dir: str,
    base_model: str | None,
    source_name: str | None,
    quantization_config: dict[str, Any],
    file_bytes: int,
    quantized_bytes: int,
    quantized_weights: int,
    bytes_before: int | None,
    source_card: str | None,
    version: str,
    format: str = "lowbit",
) -> str:
    """README.md text for a checkpoint saved to ``out_dir``.

    base_model: the source's Hub id (None for a local folder, then named ``source_name``).
    quantization_config: config.json's entry (``save.quantization_config``).
    bytes_before / quantized_bytes: the quantized modules' weights in float / as stored (None:
    unknown, e.g. a loaded checkpoint saved again); quantized_weights: how many weights that is.
    source_card: the float model's README.md.
    format: the checkpoint's format, "lowbit", "compressed-tensors" or "gguf" (how to load it).
    """
    meta, body = _split_front_matter(source_card or "")
    earlier = _LOWBIT_ORIGIN.search(body)
    if earlier is not None:  # a lowbit checkpoint saved again: its float model is the origin
        body = body.split(_ORIGINAL_NOTE, 1)[1] if _ORIGINAL_NOTE in body else ""
        if base_model is None and isinstance(meta.get("base_model"), str):
            base_model = meta["base_model"]
        source_name = earlier.group(1)
    front: dict[str, Any] = {k: meta[k] for k in _KEPT_KEYS if k in meta}
    if base_model:
        front["base_model"] = base_model
        front["base_model_relation"] = "quantized"
    groups = quantization_config["config_groups"].values()
    from lowbit.spec import QuantSpec

    widths = sorted({QuantSpec.from_dict(g["spec"]).bits for g in groups})
    tags = meta.get("tags")
    tags = [tags] if isinstance(tags, str) else list(tags) if isinstance(tags, list) else []
    if earlier is not None:  # the earlier lowbit tags describe the earlier specs
        tags = [t for t in map(str, tags)
                if t not in ("lowbit", "quantized") and not re.fullmatch(r"\d+-bit", t)]
    front["tags"] = list(dict.fromkeys(
        [*map(str, tags), "lowbit", "quantized", *(f"{b}-bit" for b in widths),
         *([format] if format in ("compressed-tensors", "gguf") else [])]))

    from lowbit.eval.size import human_bytes

    # JSON values are YAML: no YAML writer needed
    lines = ["---", *(f"{key}: {json.dumps(value, default=str)}" for key, value in front.items()),
             "---", ""]
    specs = ", ".join(g["spec_str"] for g in groups)
    lines += [f"# {Path(out_dir).name} (lowbit: {specs})", ""]
    origin = (f"`{base_model}`" if base_model else f"`{source_name}`" if source_name
              else "a float model")
    if format == "gguf":
        lines += [f"This is {origin} with its weights quantized by lowbit {version}, saved as "
                  "GGUF (`model.gguf`) for llama.cpp and the tools built on it:", "",
                  "```bash", f"llama-cli -m {out_dir}/model.gguf -p \"Hello\"", "```", "",
                  "transformers reads it too (dequantized to float): "
                  f"`AutoModelForCausalLM.from_pretrained({out_dir!r}, "
                  "gguf_file=\"model.gguf\")`.", ""]
    elif format == "compressed-tensors":
        lines += [f"This is {origin} with its weights quantized by lowbit {version}, saved in "
                  "the compressed-tensors format. vLLM serves it (`vllm serve <folder>`); "
                  "transformers loads it with the `compressed-tensors` package installed:",
                  "", "```python", "from transformers import AutoModelForCausalLM", "",
                  f"model = AutoModelForCausalLM.from_pretrained({out_dir!r})", "```", ""]
    else:
        lines += [f"This is {origin} with its weights quantized by lowbit {version}. Load it "
                  "with:", "",
                  "```python", "import lowbit", "", f"model = lowbit.load({out_dir!r})",
                  "```", ""]
    lines += ["## What was quantized", "", "| spec | modules | e.g. |", "| --- | ---: | --- |"]
    for g in groups:
        targets = g["targets"]
        lines.append(f"| `{g['spec_str']}` | {len(targets)} | `{targets[0]}` |")
    ignored = quantization_config["ignore"]
    if ignored:
        reasons = Counter(quantization_config["ignore_reasons"].get(n, "kept in float")
                          for n in ignored)
        why = "; ".join(f"{n}: {reason}" for reason, n in reasons.most_common())
        lines.append(f"| float | {len(ignored)} | `{ignored[0]}` ({why}) |")
    lines += ["", "## Size", "", "| what | bytes |", "| --- | ---: |"]
    if bytes_before is not None:
        lines.append(f"| quantized modules' weights in float | {human_bytes(bytes_before)} |")
    bits = quantized_bytes * 8 / max(quantized_weights, 1)
    lines += [f"| quantized modules as stored (codes, scales, zero-points: {bits:.3f} bits per "
              f"weight) | {human_bytes(quantized_bytes)} |",
              f"| {'model.gguf' if format == 'gguf' else 'model.safetensors'} | "
              f"{human_bytes(file_bytes)} |", ""]
    notes = quantization_config.get("notes") or []
    if notes:
        lines += ["## Notes", "", *(f"- {note}" for note in notes), ""]
    lines += ["Quality and speed were not measured when this checkpoint was saved; `lowbit eval` "
              "compares it with the float model.", ""]
    if body.strip():
        lines += ["## Original model card", "",
                  _ORIGINAL_NOTE, "",
                  body.strip(), ""]
    return "\n".join(lines)


def base_model_id(config: Any, source: str | Path | None) -> str | None:
    """The source model's Hub id, or None when it came from a local folder."""
    name = str(getattr(config, "_name_or_path", None) or source or "")
    if not name or Path(name).exists() or name.startswith((".", "/", "~")):
        return None
    return name
