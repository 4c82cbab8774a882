"""The timer of the experiments and benchmarks lives in the library (``efflax.curves`` needs it
too): this name is kept for code that imports it from here."""

from efflax._src.timing import Times
from efflax._src.timing import interleaved_times
from efflax._src.timing import timed_call

__all__ = ["Times", "interleaved_times", "timed_call"]
