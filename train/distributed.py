"""Starting JAX's multi-controller runtime, and moving host data onto the global mesh.

Under SLURM or Open MPI, ``jax.distributed.initialize()`` finds its peers
itself. Elsewhere ``--coordinator-address``, ``--num-processes`` and
``--process-id`` (or ``ROCOFT_COORDINATOR_ADDRESS``, ``ROCOFT_NUM_PROCESSES``,
``ROCOFT_PROCESS_ID``) say where they are. A process that stops sending
heartbeats for ``heartbeat_timeout`` seconds is declared dead and the others
abort with an error rather than hang in a collective.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import NamedSharding

ENV = {
    "coordinator_address": "ROCOFT_COORDINATOR_ADDRESS",
    "num_processes": "ROCOFT_NUM_PROCESSES",
    "process_id": "ROCOFT_PROCESS_ID",
}


def _launched_by_scheduler() -> bool:
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    return int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout: int = 60,
) -> bool:
    """Joins a multi-process run if one was asked for; returns whether it did."""
    coordinator_address = coordinator_address or os.environ.get(ENV["coordinator_address"])
    num_processes = num_processes or int(os.environ.get(ENV["num_processes"], "0")) or None
    if process_id is None and ENV["process_id"] in os.environ:
        process_id = int(os.environ[ENV["process_id"]])
    explicit = coordinator_address is not None
    if not explicit and not _launched_by_scheduler():
        return False
    if explicit and (num_processes is None or process_id is None):
        raise ValueError(
            "--coordinator-address needs --num-processes and --process-id "
            f"(or {ENV['num_processes']} and {ENV['process_id']})"
        )
    # CPU processes need a collectives backend of their own; GPUs use NCCL regardless.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {"heartbeat_timeout_seconds": heartbeat_timeout}
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **kwargs)
    else:
        jax.distributed.initialize(**kwargs)
    return True


def to_global(tree, shardings):
    """Arrays present in full on every process -> global arrays laid out by ``shardings``."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)

    def put(x, sharding: NamedSharding):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


def batch_to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding, global_rows: int):
    """This process's rows of a global batch -> one global array per key."""
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_rows, *v.shape[1:]))
        for k, v in local_batch.items()
    }


def barrier(name: str, timeout_s: int = 1800) -> None:
    """Waits for every process at the coordination service, which needs no collective.

    Gloo gives a collective only 30 s for all processes to arrive, so processes
    meet here after compiling, before their first collective.
    """
    if jax.process_count() > 1:
        from jax._src import distributed as jax_distributed

        jax_distributed.global_state.client.wait_at_barrier(f"rocoft_{name}", timeout_s * 1000)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is set on any process: every process gets the same answer.

    A collective in a multi-process run, so every process must call it at the same point of its program;
    with one process it returns ``flag`` and costs nothing.
    """
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag], np.int32))))


def finish() -> None:
    """Meets the other processes, then leaves the runtime together.

    Process 0 writes reports after the last collective while the others exit
    at once; without this meeting, a loaded machine can make JAX's own
    shutdown barrier time out and abort a run that succeeded.
    """
    if jax.process_count() > 1:
        barrier("finished")
        jax.distributed.shutdown()


def is_main() -> bool:
    """Only process 0 prints, logs and exports."""
    return jax.process_index() == 0
