"""The TFDS builders of the offline datasets (importing this module imports TFDS)."""

from efflax._src.data.builders import Mnist1d
from efflax._src.data.builders import StdlibText
from efflax._src.data.builders import stdlib_source_files
from efflax._src.data.builders import stdlib_split_of

__all__ = [
    "Mnist1d",
    "StdlibText",
    "stdlib_source_files",
    "stdlib_split_of",
]
