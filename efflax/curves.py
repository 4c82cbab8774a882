"""Accuracy-vs-training-time curves from one cyclic run per method (Portes et al. 2022)."""

from efflax._src.curves import Curve
from efflax._src.curves import Segment
from efflax._src.curves import TimedEval
from efflax._src.curves import cyclic_points
from efflax._src.curves import interleaved_cyclic_points
from efflax._src.curves import pareto_front
from efflax._src.curves import plot
from efflax._src.curves import summary
from efflax._src.curves import winners

__all__ = [
    "Curve",
    "Segment",
    "TimedEval",
    "cyclic_points",
    "interleaved_cyclic_points",
    "pareto_front",
    "plot",
    "summary",
    "winners",
]
