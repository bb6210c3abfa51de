"""Sentence embeddings of an encoder (BERT family) and how faithfully a quantized copy keeps them.

Pooling follows sentence-transformers' all-MiniLM-L6-v2 (``modules.json``: Transformer ->
Pooling with ``pooling_mode_mean_tokens`` -> Normalize): the mean of the last hidden states over
the attention mask, then L2 normalisation; inputs truncated at 256 tokens (``max_seq_length``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class EmbeddingFidelity:
    mean_cosine: float  # cosine similarity of each sentence's embedding to the reference's
    min_cosine: float
    nn_agreement: float  # share of sentences whose nearest other sentence is the same in both
    sentences: int


def _check_sentences(sentences: Sequence[str], at_least: int = 1) -> list[str]:
    if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
        raise TypeError("sentences must be a sequence of str (not one str)")
    if len(sentences) < at_least:
        raise ValueError(f"sentences must hold at least {at_least}, got {len(sentences)}")
    return list(sentences)


@torch.inference_mode()
def embed(
    model: Callable,
    tokenizer: Callable,
    sentences: Sequence[str],
    batch_size: int = 32,
    max_length: int = 256,
) -> torch.Tensor:
    """``[len(sentences), hidden]`` float32 unit-length embeddings (masked mean pooling).

    model: an encoder called with ``input_ids``/``attention_mask`` (and ``token_type_ids`` where
        the tokenizer gives them), returning ``last_hidden_state`` ``[B, T, hidden]``.
    """
    sentences = _check_sentences(sentences)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = []
    for i in range(0, len(sentences), batch_size):
        enc = tokenizer(
            sentences[i : i + batch_size],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        hidden = model(**enc).last_hidden_state.float()
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(F.normalize(pooled, p=2, dim=1))
    return torch.cat(out)


def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    """``[N]`` index of each row's most cosine-similar *other* row of ``embeddings [N, d]``."""
    if embeddings.dim() != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"embeddings must be [N >= 2, d], got {tuple(embeddings.shape)}")
    unit = F.normalize(embeddings.float(), dim=1)
    sim = unit @ unit.T
    sim.fill_diagonal_(float("-inf"))
    return sim.argmax(1)


def compare_embeddings(embeddings: torch.Tensor, reference: torch.Tensor) -> EmbeddingFidelity:
    """Cosine similarity row by row and nearest-neighbour agreement of two ``[N, d]`` sets."""
    if embeddings.shape != reference.shape:
        raise ValueError(
            f"embeddings {tuple(embeddings.shape)} and reference {tuple(reference.shape)} differ"
        )
    cos = F.cosine_similarity(embeddings.float(), reference.float(), dim=1)
    agree = (nearest_neighbours(embeddings) == nearest_neighbours(reference)).float().mean()
    return EmbeddingFidelity(float(cos.mean()), float(cos.min()), float(agree), len(cos))


def embedding_fidelity(
    model: Callable,
    reference: Callable,
    tokenizer: Callable,
    sentences: Sequence[str],
    batch_size: int = 32,
) -> EmbeddingFidelity:
    """How closely ``model`` reproduces ``reference``'s sentence embeddings (same tokenizer)."""
    sentences = _check_sentences(sentences, at_least=2)
    return compare_embeddings(
        embed(model, tokenizer, sentences, batch_size), embed(reference, tokenizer, sentences,
                                                              batch_size)
    )


# Varied English sentences for the demo and tests: topics repeat in pairs so that nearest
# neighbours are meaningful (a quantized encoder should find the same partner).
SENTENCES: tuple[str, ...] = (
    "The cat sat quietly on the warm windowsill.",
    "A kitten was sleeping in the afternoon sun by the window.",
    "Stock markets fell sharply after the interest rate announcement.",
    "Shares dropped across Europe when the central bank raised rates.",
    "She baked a loaf of sourdough bread with a crisp crust.",
    "Fresh bread came out of the oven golden and crunchy.",
    "The football team won the championship in extra time.",
    "After a tense overtime, the club lifted the league trophy.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar.",
    "Plants use light energy to make glucose from CO2 and water.",
    "The train to Edinburgh was delayed by two hours.",
    "Our railway journey north was held up for a couple of hours.",
    "He forgot his umbrella and got soaked in the rain.",
    "Without an umbrella, she was drenched by the sudden downpour.",
    "Python lists are mutable, while tuples cannot be changed.",
    "In Python a tuple is immutable but a list can be modified.",
    "The volcano erupted, sending ash high into the sky.",
    "Clouds of ash rose for kilometres after the eruption.",
    "Regular exercise lowers the risk of heart disease.",
    "Working out often is good for your cardiovascular health.",
    "The museum opened a new exhibition of impressionist paintings.",
    "A gallery is showing works by Monet and Renoir this spring.",
    "The recipe calls for two eggs, flour and a pinch of salt.",
    "Mix the flour with the eggs and add a little salt.",
    "Astronomers discovered a planet orbiting a distant star.",
    "A new exoplanet was found circling a faraway sun.",
    "The child learned to ride a bicycle without training wheels.",
    "My daughter can finally cycle on two wheels by herself.",
    "The committee postponed its decision until next month.",
    "The board delayed the vote to a meeting in the coming weeks.",
    "Bees are essential for pollinating many food crops.",
    "Many fruits and vegetables depend on honeybees for pollination.",
    "The laptop battery lasts about ten hours on a single charge.",
    "This notebook computer runs all day without being plugged in.",
    "The river flooded the village after days of heavy rain.",
    "Homes near the riverbank were submerged following the storms.",
    "She is learning to play the violin at the age of forty.",
    "In middle age he took up the cello and practises daily.",
    "The vaccine trial showed strong protection against the virus.",
    "Clinical results found the new jab highly effective.",
    "A good night's sleep improves memory and concentration.",
    "Resting well at night helps you focus and remember things.",
    "The ancient city walls were built from limestone blocks.",
    "Medieval fortifications of carved stone still surround the town.",
    "The company reported record profits for the third quarter.",
    "Quarterly earnings hit an all-time high, the firm announced.",
    "Whales communicate over long distances with low-frequency songs.",
    "Humpback calls can travel hundreds of kilometres under water.",
    "Please remember to water the tomatoes while I am away.",
    "Don't forget the garden plants need watering during my trip.",
    "The judge sentenced the defendant to five years in prison.",
    "The court handed the accused a five-year jail term.",
    "Electric cars are becoming cheaper to buy and to run.",
    "Battery-powered vehicles now cost less to own than before.",
    "The orchestra performed Beethoven's ninth symphony last night.",
    "Yesterday evening the philharmonic played Beethoven's Ninth.",
    "Glaciers in the Alps are melting faster than predicted.",
    "Alpine ice is retreating more quickly than scientists expected.",
    "He wrote the novel in a small cabin by the lake.",
    "The author finished her book in a lakeside hut.",
    "To reset your password, click the link in the email.",
    "Use the emailed link if you need a new login password.",
    "The bakery on the corner sells the best croissants in town.",
    "You can buy excellent pastries at the little shop down the street.",
)
