"""The model card lowbit.save writes beside a quantized checkpoint."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import lowbit
from lowbit.io.card import base_model_id, model_card
from lowbit.spec import as_spec

pytest.importorskip("transformers")
yaml = pytest.importorskip("yaml")

SOURCE_CARD = """---
license: apache-2.0
language:
- en
tags: [text-generation]
release: 2024-05-01
widget: dropped
---
# tiny

Float results: ppl 12.3.
"""


def _config(notes=()) -> dict:
    return {
        "config_groups": {"group_0": {"spec": as_spec("w4g64").to_dict(),
                                      "spec_str": "uint4-g64-asym",
                                      "targets": ["h.0.attn", "h.1.attn"]}},
        "ignore": ["lm_head", "wte"],
        "ignore_reasons": {"lm_head": "excluded by 'lm_head'"},
        "notes": list(notes),
    }


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_card_front_matter_tables_and_the_original_card_below():
    card = model_card("out/q4", "org/tiny", None, _config(["biases are kept in float"]),
                      file_bytes=2_000_000, quantized_bytes=500_000, quantized_weights=1_000_000,
                      bytes_before=4_000_000, source_card=SOURCE_CARD, version="9.9")
    meta = _front_matter(card)
    assert meta == {"license": "apache-2.0", "language": ["en"], "base_model": "org/tiny",
                    "base_model_relation": "quantized",
                    "tags": ["text-generation", "lowbit", "quantized", "4-bit"]}
    assert "# q4 (lowbit: uint4-g64-asym)" in card
    assert "`org/tiny` with its weights quantized by lowbit 9.9" in card
    assert "model = lowbit.load('out/q4')" in card
    assert "| `uint4-g64-asym` | 2 | `h.0.attn` |" in card
    assert "| float | 2 | `lm_head` (1: excluded by 'lm_head'; 1: kept in float) |" in card
    assert "4.000 bits per weight) | 500.00 kB |" in card
    assert "| quantized modules' weights in float | 4.00 MB |" in card
    assert "- biases are kept in float" in card
    original = card.split("## Original model card")[1]
    assert "# tiny\n\nFloat results: ppl 12.3." in original and "widget" not in original


def test_a_card_saved_again_keeps_one_original_and_odd_front_matter_is_survived():
    first = model_card("a", None, "src", _config(), 1, 1, 8, None, SOURCE_CARD, "1")
    again = model_card("b", None, "a", _config(), 1, 1, 8, None, first, "1")
    assert again.count("## Original model card") == 1 and "Float results" in again
    assert "`src` with its weights" in again and "weights in float" not in again
    hub = model_card("a", "org/tiny", "tiny", _config(), 1, 1, 8, None, SOURCE_CARD, "1")
    eight = {**_config(), "config_groups": {"group_0": {
        "spec": as_spec("w8").to_dict(), "spec_str": "int8-ch-sym", "targets": ["h.0.attn"]}}}
    hub_again = model_card("b", None, "a", eight, 1, 1, 8, None, hub, "1")
    assert _front_matter(hub_again)["base_model"] == "org/tiny"
    assert _front_matter(hub_again)["tags"] == ["text-generation", "lowbit", "quantized", "8-bit"]
    assert "`org/tiny` with its weights" in hub_again
    bare = model_card("a", None, None, _config(), 1, 1, 8, None, None, "1")
    bare_again = model_card("b", None, "a", _config(), 1, 1, 8, None, bare, "1")
    assert "## Original model card" not in bare_again
    assert "a float model with its weights" in bare_again
    for odd in ("---\n: [\n---\nbody", "---\nintro paragraph\n---\nbody", "no front matter"):
        card = model_card("c", None, None, _config(), 1, 1, 8, None, odd, "1")
        assert _front_matter(card)["tags"] == ["lowbit", "quantized", "4-bit"]
        assert "a float model with its weights" in card
        assert odd.strip() in card.split("## Original model card")[1]  # nothing lost
    bom = model_card("e", None, None, _config(), 1, 1, 8, None, "\ufeff" + SOURCE_CARD, "1")
    assert _front_matter(bom)["license"] == "apache-2.0"
    dated = SOURCE_CARD.replace("tags: [text-generation]", "tags: on\nlicense_name: 2024-05-01")
    meta = _front_matter(model_card("d", None, None, _config(), 1, 1, 8, None, dated, "1"))
    assert meta["license_name"] == "2024-05-01"  # a YAML date, written back as a string
    assert meta["tags"] == ["lowbit", "quantized", "4-bit"]  # a bool ``tags`` is dropped


def test_base_model_is_a_hub_id_never_a_local_path(tmp_path):
    assert base_model_id(SimpleNamespace(_name_or_path="org/model"), None) == "org/model"
    assert base_model_id(SimpleNamespace(_name_or_path=str(tmp_path)), None) is None
    assert base_model_id(SimpleNamespace(_name_or_path=""), "./here") is None
    assert base_model_id(SimpleNamespace(), None) is None


def test_save_writes_the_card_for_quantized_models_only(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lowbit.models.hf import load_hf_model

    source = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=128,
                               n_positions=32)).save_pretrained(source)
    (source / "README.md").write_text(SOURCE_CARD)
    model, _, _ = load_hf_model(source)
    lowbit.save(model, tmp_path / "float")
    assert (tmp_path / "float" / "README.md").read_text() == SOURCE_CARD
    lowbit.quantize(model, "w8", exclude=["lm_head"])
    lowbit.save(model, tmp_path / "q")
    card = (tmp_path / "q" / "README.md").read_text()
    assert "`tiny-gpt2` with its weights" in card and "`int8-ch-sym` | 10 |" in card
    assert card.count("Float results") == 1
    assert "base_model" not in _front_matter(card)  # a local folder is no Hub id
