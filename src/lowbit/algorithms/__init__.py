"""Weight-updating algorithms, registered by name: rtn, gptq, hqq, awq, smoothquant."""

from __future__ import annotations

from lowbit.algorithms.awq import AWQ
from lowbit.algorithms.base import RTN, Algorithm, LayerStats
from lowbit.algorithms.gptq import GPTQ
from lowbit.algorithms.hqq import HQQ
from lowbit.algorithms.smoothquant import SmoothQuant

ALGORITHMS: dict[str, type[Algorithm]] = {
    "rtn": RTN, "gptq": GPTQ, "hqq": HQQ, "awq": AWQ, "smoothquant": SmoothQuant,
}


def get_algorithm(algorithm: str | Algorithm) -> Algorithm:
    """An Algorithm object from a name (default hyper-parameters) or an object."""
    if isinstance(algorithm, Algorithm):
        return algorithm
    if isinstance(algorithm, str):
        key = algorithm.lower()
        if key == "gptq-act-order":
            return GPTQ(act_order=True)
        if key in ALGORITHMS:
            return ALGORITHMS[key]()
    raise ValueError(
        f"algorithm={algorithm!r}; allowed: {', '.join(ALGORITHMS)}, gptq-act-order, "
        "or an Algorithm object such as GPTQ(act_order=True)"
    )


__all__ = [
    "ALGORITHMS", "AWQ", "GPTQ", "HQQ", "RTN", "Algorithm", "LayerStats", "SmoothQuant",
    "get_algorithm",
]
