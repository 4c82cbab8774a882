"""Offline datasets (TFDS ``array_record`` builders) and a deterministic, resumable loader.

The TFDS builders live in ``efflax.data.builders`` (imported on first use of a dataset).
"""

from efflax._src.data.loader import AVAILABLE
from efflax._src.data.loader import Loader
from efflax._src.data.loader import data_dir
from efflax._src.data.loader import data_source
from efflax._src.data.loader import load
from efflax._src.data.loader import load_arrays
