import copy

import pytest
import torch
from torch.utils.data import DataLoader

from lowbit.calib import as_batches


class CharTokenizer:
    """One token per character (enough to test windowing without a real vocabulary)."""

    def __call__(self, text, return_tensors=None, add_special_tokens=True, verbose=True):
        return {"input_ids": torch.tensor([[ord(c) for c in text]])}


def test_strings_are_joined_tokenized_and_windowed():
    batches = as_batches(["abcd", "efgh"], CharTokenizer(), n_samples=2, seq_len=4, batch_size=1)
    assert [b.tolist() for b in batches] == [[[97, 98, 99, 100]], [[10, 10, 101, 102]]]
    many = as_batches("x" * 100, CharTokenizer(), n_samples=20, seq_len=10, batch_size=4)
    assert [tuple(b.shape) for b in many] == [(4, 10), (4, 10), (2, 10)]
    capped = as_batches("x" * 100, CharTokenizer(), n_samples=3, seq_len=10)
    assert [tuple(b.shape) for b in capped] == [(3, 10)]


def test_too_little_text_says_how_many_tokens():
    with pytest.raises(ValueError, match="gives 5 tokens; one window needs seq_len=8"):
        as_batches(["hello"], CharTokenizer(), seq_len=8)
    with pytest.raises(ValueError, match="pass tokenizer="):
        as_batches(["hello"])


def test_token_id_tensors():
    one = as_batches(torch.arange(10))
    assert len(one) == 1 and one[0].shape == (1, 10)
    rows = as_batches(torch.zeros(20, 6, dtype=torch.long), n_samples=10, batch_size=4)
    assert [b.shape[0] for b in rows] == [4, 4, 2]
    feats = as_batches(torch.randn(5, 3))  # float inputs of a non-LM model pass through
    assert feats[0].shape == (5, 3) and feats[0].dtype == torch.float32


def test_dataloader_of_dicts_and_iterables_of_tensors():
    data = [{"input_ids": torch.full((7,), i), "attention_mask": torch.ones(7)} for i in range(6)]
    batches = as_batches(DataLoader(data, batch_size=4), n_samples=5)
    assert [tuple(b.shape) for b in batches] == [(4, 7), (1, 7)]
    assert batches[1].tolist() == [[4] * 7]
    gen = as_batches(torch.ones(2, 3, dtype=torch.long) for _ in range(3))
    assert len(gen) == 3


@pytest.mark.parametrize("calib", [[], torch.empty(0, dtype=torch.long), iter([])])
def test_empty_calib(calib):
    with pytest.raises(ValueError, match="calib is empty"):
        as_batches(calib)


def test_bad_calib_types():
    with pytest.raises(ValueError, match="calib is None"):
        as_batches(None)
    with pytest.raises(TypeError, match="calib is a int"):
        as_batches(3)
    with pytest.raises(TypeError, match="calib batch 0 is a float"):
        as_batches([1.5])
    with pytest.raises(ValueError, match="without 'input_ids'"):
        as_batches([{"ids": torch.ones(3)}])
    with pytest.raises(ValueError, match="n_samples"):
        as_batches(torch.ones(3, dtype=torch.long), n_samples=0)


def test_real_tokenizer(fixture_lm):
    tok, _, text = fixture_lm
    batches = as_batches([text[:5000]], tok, n_samples=3, seq_len=64)
    assert [tuple(b.shape) for b in batches] == [(3, 64)] and batches[0].dtype == torch.long
    expected = tok(text[:5000], add_special_tokens=False)["input_ids"][:64]
    assert batches[0][0].tolist() == expected


def test_position_limits_come_from_learned_position_tables_only():
    transformers = pytest.importorskip("transformers")

    from lowbit.calib.batches import position_limit

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=40))
    roberta = transformers.RobertaModel(transformers.RobertaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=64, max_position_embeddings=18, pad_token_id=1))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        vocab_size=64, max_position_embeddings=16))
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64, vocab_size=64,
        max_position_embeddings=24, word_embed_proj_dim=32))
    assert position_limit(gpt2) == 40 and position_limit(roberta) == 16
    assert position_limit(opt) == 24  # its table has 26 rows, ids start at 2
    assert position_limit(llama) is None  # rotary: no table, no hard limit


def test_padded_dict_batches_lose_their_padding_and_regroup_by_length():
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5], [0, 8, 9, 10, 11], [9, 9, 9, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    batches = as_batches([{"input_ids": ids, "attention_mask": mask}])
    assert [b.tolist() for b in batches] == [[[5, 6, 7], [9, 9, 9]], [[1, 2, 3, 4, 5]],
                                             [[8, 9, 10, 11]]]
    assert [b.shape[0] for b in as_batches([{"input_ids": ids, "attention_mask": mask}],
                                           n_samples=3)] == [2, 1]
    full = as_batches([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    assert len(full) == 1 and torch.equal(full[0], ids)
    with pytest.raises(ValueError, match=r"calib batch 0: attention_mask of shape \(4, 4\)"):
        as_batches([{"input_ids": ids, "attention_mask": mask[:, :4]}])


def test_static_ranges_from_padded_batches_are_those_of_the_real_tokens():
    from transformers import LlamaConfig, LlamaForCausalLM

    import lowbit

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=16)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[0] = 100.0  # the pad token: a huge activation
    ids = torch.tensor([[0, 0, 5, 6, 7], [3, 4, 5, 6, 7]])
    mask = (ids != 0).long()
    padded = lowbit.quantize(copy.deepcopy(model), "w8a8-static",
                             calib=[{"input_ids": ids, "attention_mask": mask}])
    real = lowbit.quantize(model, "w8a8-static",
                           calib=[torch.tensor([[5, 6, 7]]), torch.tensor([[3, 4, 5, 6, 7]])])
    scales = [(name, a, b) for (name, a), (_, b) in
              zip(padded.named_buffers(), real.named_buffers(), strict=True)
              if name.endswith("input_scale")]
    assert len(scales) == 8  # 7 linears of the block and lm_head
    for name, a, b in scales:
        assert torch.equal(a, b), name
