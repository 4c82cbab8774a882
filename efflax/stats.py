"""Estimates with 95% intervals over seeds, and PASS / FAIL / INCONCLUSIVE decisions."""

from efflax._src.stats import STATUSES
from efflax._src.stats import Estimate
from efflax._src.stats import bootstrap_interval
from efflax._src.stats import combine_statuses
from efflax._src.stats import decide
from efflax._src.stats import mean_interval
from efflax._src.stats import offset
from efflax._src.stats import paired_difference
from efflax._src.stats import ratio_interval
from efflax._src.stats import seeds_to_decide

__all__ = [
    "STATUSES",
    "Estimate",
    "bootstrap_interval",
    "combine_statuses",
    "decide",
    "mean_interval",
    "offset",
    "paired_difference",
    "ratio_interval",
    "seeds_to_decide",
]
