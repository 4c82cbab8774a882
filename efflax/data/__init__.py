"""Offline datasets (TFDS ``array_record`` builders) and a deterministic, resumable loader.

The TFDS builders live in ``efflax.data.builders`` (imported on first use of a dataset).
"""

from efflax.data.loader import AVAILABLE
from efflax.data.loader import Loader
from efflax.data.loader import data_dir
from efflax.data.loader import data_source
from efflax.data.loader import load
from efflax.data.loader import load_arrays
