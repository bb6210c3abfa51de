"""Sliding-window perplexity and logit comparison: window bookkeeping, toy models with known
answers, and the fixture Llama against direct computations (full-split check: LOWBIT_SLOW=1)."""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lowbit.eval.perplexity import compare_logits, perplexity, sliding_windows

SHARED = Path(__file__).resolve().parents[3] / "shared"
LLAMA_3M = SHARED / "models" / "llama-3m-shakespeare-mix"
TEST_TEXT = SHARED / "data" / "shakespeare-mix-test.txt"


@pytest.mark.parametrize(
    ("n", "context", "stride"),
    [(10, 4, 2), (11, 4, 2), (10, 4, 4), (4, 4, 1), (1000, 64, 17), (513, 512, 256), (2, 2, 1)],
)
def test_windows_score_every_target_once(n: int, context: int, stride: int) -> None:
    windows = sliding_windows(n, context, stride)
    scored = [t for w in windows for t in range(w.score_from, w.end)]
    assert scored == list(range(1, n))
    for i, w in enumerate(windows):
        assert 0 <= w.begin < w.score_from <= w.end <= n
        assert w.end - w.begin <= context
        if i > 0:
            # each scored target keeps at least context - stride tokens of context (less only
            # when stride == context, where one token of context is the minimum)
            assert w.score_from - w.begin >= max(context - stride, 1)
            assert w.n_scored <= stride


def test_windows_follow_the_stride() -> None:
    windows = sliding_windows(1024, 512, 256)
    assert [(w.begin, w.end, w.score_from) for w in windows] == [
        (0, 512, 1), (256, 768, 512), (512, 1024, 768)
    ]


@pytest.mark.parametrize(("context", "stride"), [(1, 1), (8, 0), (8, 9), (8.0, 4)])
def test_bad_protocol_raises(context, stride) -> None:
    with pytest.raises(ValueError, match="context|stride"):
        sliding_windows(100, context, stride)


class Uniform(torch.nn.Module):
    """Equal logits for every token: perplexity must be exactly the vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.calls: list[tuple[int, ...]] = []

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(input_ids.shape))
        return torch.zeros(*input_ids.shape, self.vocab)


class Bigram(torch.nn.Module):
    """Logits depend only on the current token (a fixed random table)."""

    def __init__(self, vocab: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(vocab, vocab, generator=g) * 3

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids]


def test_uniform_model_perplexity_is_vocab_size() -> None:
    ids = torch.randint(0, 50, (301,))
    model = Uniform(50)
    r = perplexity(model, ids, context=64, stride=32, batch_size=3)
    assert r.ppl == pytest.approx(50.0, rel=1e-6)
    assert r.tokens == 300 and r.windows == len(sliding_windows(301, 64, 32))
    # batches of 3 full windows, the rest, and the short final window on its own
    assert all(shape[0] <= 3 for shape in model.calls) and model.calls[-1][1] < 64


@pytest.mark.parametrize(("context", "stride", "batch_size"), [(16, 8, 1), (16, 16, 4), (7, 3, 5)])
def test_bigram_matches_direct_cross_entropy(context: int, stride: int, batch_size: int) -> None:
    # A bigram model's prediction ignores context, so any window protocol must give the plain
    # cross-entropy of every next token.
    ids = torch.randint(0, 40, (203,), generator=torch.Generator().manual_seed(1))
    model = Bigram(40)
    direct = F.cross_entropy(model.table[ids[:-1]], ids[1:]).item()
    r = perplexity(model, ids, context=context, stride=stride, batch_size=batch_size)
    assert r.nll == pytest.approx(direct, rel=1e-6)
    assert r.tokens == 202


def test_max_tokens_and_short_input() -> None:
    ids = torch.randint(0, 10, (100,))
    assert perplexity(Uniform(10), ids, 16, 8, max_tokens=50).tokens == 49
    with pytest.raises(ValueError, match="has 10 tokens.*needs at least 16"):
        perplexity(Uniform(10), ids, 16, 8, max_tokens=10)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(Uniform(10), ids.float(), 16, 8)
    with pytest.raises(TypeError, match="ids"):
        perplexity(Uniform(10), ids.tolist(), 16, 8)


def test_compare_logits_toy() -> None:
    ids = torch.randint(0, 30, (150,), generator=torch.Generator().manual_seed(2))
    ref = Bigram(30, seed=0)
    same = compare_logits(ref, ref, ids, 32, 16)
    assert same.kl_mean == pytest.approx(0.0, abs=1e-6) and same.top1_agreement == 1.0
    assert same.ppl == pytest.approx(same.reference_ppl)
    assert same.ppl == pytest.approx(perplexity(ref, ids, 32, 16).ppl, rel=1e-6)
    other = Bigram(30, seed=1)
    c = compare_logits(other, ref, ids, 32, 16)
    # direct KL(ref || other) over the same 149 targets
    logp, logq = F.log_softmax(ref.table[ids[:-1]], -1), F.log_softmax(other.table[ids[:-1]], -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    assert c.kl_mean == pytest.approx(kl.mean().item(), rel=1e-5)
    assert c.kl_max == pytest.approx(kl.max().item(), rel=1e-5)
    assert c.kl_mean <= c.kl_p99 <= c.kl_max
    agree = (ref.table[ids[:-1]].argmax(-1) == other.table[ids[:-1]].argmax(-1)).float().mean()
    assert c.top1_agreement == pytest.approx(agree.item())
    with pytest.raises(ValueError, match="vocabularies"):
        compare_logits(Uniform(31), ref, ids, 32, 16)


# ---- the fixture Llama ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama():
    pytest.importorskip("transformers")
    if not LLAMA_3M.is_dir() or not TEST_TEXT.is_file():
        pytest.skip(f"fixture model {LLAMA_3M} or {TEST_TEXT} is absent")
    from lowbit.models.hf import load_hf_model

    model, tok, kind = load_hf_model(LLAMA_3M)
    assert kind == "causal-lm"
    text = TEST_TEXT.read_text(encoding="utf-8")
    ids = tok(text[:20_000], return_tensors="pt", verbose=False).input_ids[0]
    return model, ids


def test_llama_one_window_equals_hf_loss(llama) -> None:
    model, ids = llama
    with torch.inference_mode():
        loss = model(input_ids=ids[None, :256], labels=ids[None, :256]).loss.item()
    r = perplexity(model, ids, context=256, stride=128, max_tokens=256)
    assert r.windows == 1 and r.tokens == 255
    assert r.nll == pytest.approx(loss, rel=1e-5)


def test_llama_sliding_windows_equal_direct_sum(llama) -> None:
    model, ids = llama
    n = 640
    r = perplexity(model, ids, context=256, stride=128, max_tokens=n, batch_size=2)
    total = 0.0
    with torch.inference_mode():
        for w in sliding_windows(n, 256, 128):
            logits = model(input_ids=ids[None, w.begin : w.end]).logits[0]
            # position p predicts token begin + p + 1; keep the positions of the scored targets
            targets = ids[w.score_from : w.end]
            rows = logits[w.score_from - w.begin - 1 : w.end - w.begin - 1]
            total += F.cross_entropy(rows, targets, reduction="sum").item()
    assert r.tokens == n - 1
    assert r.nll == pytest.approx(total / (n - 1), rel=1e-5)
    # more context helps this model: sliding windows beat non-overlapping ones
    assert r.nll < perplexity(model, ids, 256, 256, max_tokens=n).nll


def test_llama_quantized_copy_is_close_but_not_equal(llama) -> None:
    import lowbit

    model, ids = llama
    q8 = lowbit.quantize(copy.deepcopy(model), "w8")
    q2 = lowbit.quantize(copy.deepcopy(model), "w2g64")
    c8 = compare_logits(q8, model, ids, 256, 128, max_tokens=512)
    c2 = compare_logits(q2, model, ids, 256, 128, max_tokens=512)
    assert c8.tokens == 511
    assert 0 < c8.kl_mean < 0.01 and c8.top1_agreement > 0.9
    assert c2.kl_mean > 10 * c8.kl_mean and c2.top1_agreement < c8.top1_agreement
    assert c8.reference_ppl == pytest.approx(perplexity(model, ids, 256, 128, 512).ppl, rel=1e-5)
    assert math.isfinite(c2.ppl) and c2.ppl > c2.reference_ppl


@pytest.mark.skipif(os.environ.get("LOWBIT_SLOW") != "1", reason="full split: set LOWBIT_SLOW=1")
def test_llama_full_test_split_matches_fixture_readme() -> None:
    # README of llama-3m-shakespeare-mix: sliding window on test, CPU, context 512 stride 256:
    # 4.0372 / 56.67 over 294,890 tokens (about 10 minutes on 2 busy cores).
    pytest.importorskip("transformers")
    if not LLAMA_3M.is_dir() or not TEST_TEXT.is_file():
        pytest.skip(f"fixture model {LLAMA_3M} or {TEST_TEXT} is absent")
    from lowbit.models.hf import load_hf_model

    model, tok, _ = load_hf_model(LLAMA_3M)
    ids = tok(TEST_TEXT.read_text(encoding="utf-8"), return_tensors="pt", verbose=False).input_ids
    r = perplexity(model, ids, context=512, stride=256)
    assert r.tokens == 294_890
    assert round(r.nll, 4) == 4.0372 and round(r.ppl, 2) == 56.67
