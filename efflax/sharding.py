"""Device meshes and the one table that maps logical axis names to mesh axes."""

from efflax._src.sharding import BATCH_AXES
from efflax._src.sharding import LOGICAL_AXIS_RULES
from efflax._src.sharding import MESH_AXES
from efflax._src.sharding import auto_axes
from efflax._src.sharding import batch_axes
from efflax._src.sharding import data_sharding
from efflax._src.sharding import logical_to_mesh_spec
from efflax._src.sharding import make_mesh
from efflax._src.sharding import params_shardings
from efflax._src.sharding import replicated
from efflax._src.sharding import shard_batch
from efflax._src.sharding import shard_map
from efflax._src.sharding import shard_params

__all__ = [
    "BATCH_AXES",
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "auto_axes",
    "batch_axes",
    "data_sharding",
    "logical_to_mesh_spec",
    "make_mesh",
    "params_shardings",
    "replicated",
    "shard_batch",
    "shard_map",
    "shard_params",
]
