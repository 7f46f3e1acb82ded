"""One process of a multi-process job that saves the same steps in both checkpoint managers.

  launch/local_multiprocess.sh 2 python tests/checkpoint_worker.py WORKDIR

The newest and the best checkpoint of a step are saved back to back, as the trainer does when
a dev-evaluation step is also a checkpoint step. The state is large enough (64 MB) that the two
asynchronous writes overlap, which is when orbax's per-step barriers of the two managers
collided. Prints "restored N" after reading the last step back.
"""

import sys

from rerank.training import distributed

distributed.initialize()  # before any device is used

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from rerank.training import checkpoints  # noqa: E402


def main(workdir: str) -> None:
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  rows = NamedSharding(mesh, P("data"))
  w = jax.device_put(jnp.arange(8 * 2_000_000, dtype=jnp.float32).reshape(8, 2_000_000), rows)
  state = {"params": {"w": w}, "step": jax.device_put(jnp.int32(0), NamedSharding(mesh, P()))}
  with checkpoints.Checkpoints(workdir) as ckpts:
    for step in range(1, 9):  # the collision depends on timing: try it 8 times
      ckpts.save_best(step, state["params"], dev_score=float(step))
      ckpts.save(step, state)
  with checkpoints.Checkpoints(workdir) as ckpts:
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    params, which = ckpts.restore_params(abstract)
    restored = jax.experimental.multihost_utils.process_allgather(params["w"], tiled=True)
    np.testing.assert_array_equal(restored, np.arange(8 * 2_000_000).reshape(8, 2_000_000))
    distributed.log(f"restored {which}, newest step {ckpts.latest_step()}")


if __name__ == "__main__":
  main(sys.argv[1])
