"""Multi-process runs through JAX's own distributed runtime.

Every process calls `initialize` before its first use of jax; afterwards `jax.devices()` lists
the devices of all processes and `make_mesh` spans them. On CPUs the processes exchange
collectives through gloo over TCP (loopback for tests, a network across hosts).
"""

import dataclasses
import os
import socket
import sys
import time

import jax

ENV_COORDINATOR = "DFJAX_COORDINATOR"
ENV_NUM_PROCESSES = "DFJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "DFJAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  coordinator: str  # host:port of process 0's coordination service
  num_processes: int
  process_id: int

  def __post_init__(self):
    host, _, port = self.coordinator.rpartition(":")
    if not host or not port.isdigit():
      raise ValueError(f"coordinator {self.coordinator!r} must be host:port, e.g. 10.0.0.1:12345.")
    if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
      raise ValueError(f"process id {self.process_id} must lie in [0, {self.num_processes}) "
                       f"for {self.num_processes} processes.")

  @classmethod
  def from_env(cls, coordinator=None, num_processes=None, process_id=None) -> "ProcessGroup | None":
    """Arguments first, then DFJAX_COORDINATOR / DFJAX_NUM_PROCESSES / DFJAX_PROCESS_ID; None if unset."""
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR)
    num_processes = num_processes if num_processes is not None else os.environ.get(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else os.environ.get(ENV_PROCESS_ID)
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    if all(v is None for v in given.values()):
      return None
    missing = [k for k, v in given.items() if v is None]
    if missing:
      raise ValueError(f"a multi-process run needs coordinator, num_processes and process_id; missing "
                       f"{missing} (flags or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}).")
    return cls(coordinator, int(num_processes), int(process_id))


def initialize(group: ProcessGroup | None, *, timeout_s: int = 60) -> None:
  """Joins the process group (no-op for None).

  A process other than 0 first waits up to `timeout_s` for the coordinator's port to accept
  connections and raises ConnectionError if it never does: JAX's runtime would abort the process
  with a fatal log instead of an exception.
  """
  if group is None or group.num_processes == 1:
    return
  if group.process_id != 0:
    _wait_for_coordinator(group, timeout_s)
  else:
    print(f"dfjax: coordinating {group.num_processes} processes at {group.coordinator} "
          f"(waiting up to {timeout_s} s for them to join)", file=sys.stderr)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(group.coordinator, group.num_processes, group.process_id,
                             initialization_timeout=timeout_s)


def _wait_for_coordinator(group: ProcessGroup, timeout_s: float) -> None:
  host, _, port = group.coordinator.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=1):
        return
    except OSError as error:
      if time.monotonic() > deadline:
        raise ConnectionError(
            f"process {group.process_id} of {group.num_processes} could not join the coordinator at "
            f"{group.coordinator} within {timeout_s} s: check that process 0 runs and that the "
            f"address and port are reachable from this host ({error}).") from None
      time.sleep(0.2)
