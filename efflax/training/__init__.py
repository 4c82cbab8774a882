"""A small training harness: train state, jitted step, ``fit`` with exact resume, plots."""

from efflax._src.training.loop import CheckpointError
from efflax._src.training.loop import Hook
from efflax._src.training.loop import fit
from efflax._src.training.loop import open_checkpoints
from efflax._src.training.loop import place_on_mesh
from efflax._src.training.loop import plot_metrics
from efflax._src.training.loop import read_metrics
from efflax._src.training.loop import restore_latest
from efflax._src.training.state import LossOutput
from efflax._src.training.state import TrainState
from efflax._src.training.state import classification_eval_fn
from efflax._src.training.state import cross_entropy_loss_fn
from efflax._src.training.state import make_train_step
