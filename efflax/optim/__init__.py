"""optax transforms and training tools: SAF/MESA, sharpness probes, ProxSkip, cyclic LRs."""

from efflax.optim.proxskip import LocalGDState
from efflax.optim.proxskip import ProxSkipState
from efflax.optim.proxskip import communication_period
from efflax.optim.proxskip import consensus_average
from efflax.optim.proxskip import distributed_gd
from efflax.optim.proxskip import local_gd
from efflax.optim.proxskip import make_client_step
from efflax.optim.proxskip import proxskip
from efflax.optim.saf import LogitsBuffer
from efflax.optim.saf import check_indices
from efflax.optim.saf import ema_update
from efflax.optim.saf import init_ema
from efflax.optim.saf import init_logits_buffer
from efflax.optim.saf import logits_buffer_bytes
from efflax.optim.saf import mesa_loss
from efflax.optim.saf import read_logits
from efflax.optim.saf import saf_loss
from efflax.optim.saf import trajectory_loss
from efflax.optim.saf import with_index_check
from efflax.optim.saf import write_logits
from efflax.optim.schedules import cycle_end_steps
from efflax.optim.schedules import cycle_lengths
from efflax.optim.schedules import exponential_cyclic_cosine_schedule
from efflax.optim.schedules import tradeoff_points
