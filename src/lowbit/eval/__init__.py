"""Measuring what quantization gains and loses: size (and, later, speed and accuracy)."""

from lowbit.eval.embeddings import EmbeddingFidelity, embed, embedding_fidelity
from lowbit.eval.perplexity import LogitComparison, PerplexityResult, compare_logits, perplexity
from lowbit.eval.size import SizeRow, size_from_model, size_from_params
from lowbit.eval.speed import PeakMemory, latency, peak_rss, weight_bytes

__all__ = [
    "EmbeddingFidelity", "LogitComparison", "PeakMemory", "PerplexityResult", "SizeRow",
    "compare_logits", "embed", "embedding_fidelity", "latency", "peak_rss", "perplexity",
    "size_from_model", "size_from_params", "weight_bytes",
]
