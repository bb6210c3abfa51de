"""Weight-updating algorithms, registered by name: rtn, gptq, hqq."""

from __future__ import annotations

from lowbit.algorithms.base import RTN, Algorithm, LayerStats
from lowbit.algorithms.gptq import GPTQ
from lowbit.algorithms.hqq import HQQ

ALGORITHMS: dict[str, type[Algorithm]] = {"rtn": RTN, "gptq": GPTQ, "hqq": HQQ}


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


__all__ = ["ALGORITHMS", "GPTQ", "HQQ", "RTN", "Algorithm", "LayerStats", "get_algorithm"]
