from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
LM_PATH = SHARED / "models" / "llama-3m-shakespeare-mix"
VAL_TEXT = SHARED / "data" / "shakespeare-mix-val.txt"


@pytest.fixture(scope="module")
def fixture_lm():
    """(tokenizer, float32 model loader, validation text) of the 3M-parameter fixture LM."""
    if not (LM_PATH / "config.json").exists() or not VAL_TEXT.exists():
        pytest.skip(f"fixture LM or text absent ({LM_PATH}, {VAL_TEXT})")
    transformers = pytest.importorskip("transformers")
    import torch

    tok = transformers.AutoTokenizer.from_pretrained(LM_PATH)

    def load():
        return transformers.AutoModelForCausalLM.from_pretrained(LM_PATH, dtype=torch.float32)

    return tok, load, VAL_TEXT.read_text(encoding="utf-8")
