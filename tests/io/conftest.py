"""Fixtures shared by the io tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[3] / "shared"
LLAMA_3M = SHARED / "models" / "llama-3m-shakespeare-mix"


@pytest.fixture(scope="module")
def llama():
    """The 3M fixture LM in float32, its tokenizer, and the ids of one sentence."""
    pytest.importorskip("transformers")
    if not (LLAMA_3M / "config.json").exists():
        pytest.skip(f"fixture model {LLAMA_3M} is absent")
    from lowbit.models.hf import load_hf_model

    model, tokenizer, _ = load_hf_model(LLAMA_3M)
    ids = torch.tensor([tokenizer("To be, or not to be: that is the question.")["input_ids"]])
    return model, tokenizer, ids
