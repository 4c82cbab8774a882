"""Accuracy-vs-training-time curves from one cyclic run per method (Portes et al. 2022), and
the one timer (round-robin wall and CPU times) they and the benchmarks use."""

from efflax._src.curves import Curve
from efflax._src.curves import Segment
from efflax._src.curves import TimedEval
from efflax._src.curves import cyclic_points
from efflax._src.curves import interleaved_cyclic_points
from efflax._src.curves import pareto_front
from efflax._src.curves import plot
from efflax._src.curves import summary
from efflax._src.curves import time_speedup
from efflax._src.curves import time_to_reach
from efflax._src.curves import winners
from efflax._src.timing import ProgramStats
from efflax._src.timing import Times
from efflax._src.timing import alone
from efflax._src.timing import decisive_clock
from efflax._src.timing import interleaved_times
from efflax._src.timing import markdown_table
from efflax._src.timing import program_stats
from efflax._src.timing import relative_error
from efflax._src.timing import timed_call
from efflax._src.timing import training_step

__all__ = [
    "Curve",
    "ProgramStats",
    "Segment",
    "TimedEval",
    "Times",
    "alone",
    "cyclic_points",
    "decisive_clock",
    "interleaved_cyclic_points",
    "interleaved_times",
    "markdown_table",
    "pareto_front",
    "plot",
    "program_stats",
    "relative_error",
    "summary",
    "time_speedup",
    "time_to_reach",
    "timed_call",
    "training_step",
    "winners",
]
