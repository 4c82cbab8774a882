"""optax transforms and training tools: SAF/MESA, sharpness probes, ProxSkip, cyclic LRs."""

from efflax.optim.schedules import cycle_end_steps
from efflax.optim.schedules import cycle_lengths
from efflax.optim.schedules import exponential_cyclic_cosine_schedule
from efflax.optim.schedules import tradeoff_points
