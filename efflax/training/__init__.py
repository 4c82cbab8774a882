"""A small training harness: train state, jitted step, ``fit`` with exact resume, plots, and
many seeds (and arms) trained as one program (``fit_seeds``)."""

from efflax._src.training.loop import CheckpointError
from efflax._src.training.loop import Hook
from efflax._src.training.loop import fit
from efflax._src.training.loop import open_checkpoints
from efflax._src.training.loop import place_on_mesh
from efflax._src.training.loop import plot_metrics
from efflax._src.training.loop import read_metrics
from efflax._src.training.loop import restore_latest
from efflax._src.training.multiseed import SeedLoader
from efflax._src.training.multiseed import SeedRun
from efflax._src.training.multiseed import SplitLoader
from efflax._src.training.multiseed import arm_names
from efflax._src.training.multiseed import arm_state
from efflax._src.training.multiseed import fit_seeds
from efflax._src.training.multiseed import init_params
from efflax._src.training.multiseed import num_seeds
from efflax._src.training.multiseed import per_seed
from efflax._src.training.multiseed import per_seed_curve
from efflax._src.training.multiseed import plot_arms
from efflax._src.training.multiseed import seed_key
from efflax._src.training.multiseed import seed_state
from efflax._src.training.multiseed import seeds_eval
from efflax._src.training.multiseed import seeds_eval_fn
from efflax._src.training.multiseed import seeds_step
from efflax._src.training.multiseed import stack_arms
from efflax._src.training.multiseed import stack_states
from efflax._src.training.multiseed import unstack_state
from efflax._src.training.state import LossOutput
from efflax._src.training.state import TrainState
from efflax._src.training.state import batched_apply
from efflax._src.training.state import classification_eval_fn
from efflax._src.training.state import cross_entropy_loss_fn
from efflax._src.training.state import make_train_step
from efflax._src.training.state import repeated_step
