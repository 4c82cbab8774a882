"""A small training harness: train state, jitted step, ``fit`` with exact resume, plots."""

from efflax.training.loop import CheckpointError
from efflax.training.loop import Hook
from efflax.training.loop import fit
from efflax.training.loop import open_checkpoints
from efflax.training.loop import plot_metrics
from efflax.training.loop import read_metrics
from efflax.training.loop import restore_latest
from efflax.training.state import TrainState
from efflax.training.state import classification_eval_fn
from efflax.training.state import cross_entropy_loss_fn
from efflax.training.state import make_train_step
