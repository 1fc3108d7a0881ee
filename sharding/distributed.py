"""Multi-process runs through JAX's own distributed runtime.

Every process calls `initialize` before its first use of jax; afterwards `jax.devices()` lists
the devices of all processes and `make_mesh` spans them. On CPUs the processes exchange
collectives through gloo over TCP (loopback for tests, a network across hosts).

JAX's runtime aborts the whole process with a fatal log, not an exception, when start-up goes
wrong (nobody joins process 0, two processes share an id, something else answers the port), and
it silently accepts processes that disagree on the process count. So `initialize` first runs a
small check-in of its own on the coordinator port: process 0 listens there, every other process
reports its id and count, and process 0 answers "ok" once all ids 1 … n−1 have joined with the
same count, or an error naming the cause to everyone. Only then does process 0 hand the port to
JAX's coordination service.
"""

import dataclasses
import os
import socket
import sys
import threading
import time

import jax

ENV_COORDINATOR = "DFJAX_COORDINATOR"
ENV_NUM_PROCESSES = "DFJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "DFJAX_PROCESS_ID"

_GREETING = "dfjax-coordinator 1"  # process 0's first line: a port that says anything else is not a dfjax run
_JOIN = "dfjax-join"  # "dfjax-join ID COUNT" from every other process
_ERRORS = {"ValueError": ValueError, "ConnectionError": ConnectionError}  # what process 0's reply can raise
_HELLO_WAIT_S = 2.0  # how long process 0 waits for a connected peer's join line before ignoring it


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
  coordinator: str  # host:port of process 0's coordination service
  num_processes: int
  process_id: int

  def __post_init__(self):
    host, _, port = self.coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
      raise ValueError(f"coordinator {self.coordinator!r} must be host:port with a port in 1 … 65535, "
                       f"e.g. 10.0.0.1:12345.")
    if self.num_processes < 1:
      raise ValueError(f"num_processes={self.num_processes} must be at least 1.")
    if not 0 <= self.process_id < self.num_processes:
      raise ValueError(f"process id {self.process_id} must lie in [0, {self.num_processes}) "
                       f"for {self.num_processes} processes.")

  @classmethod
  def from_env(cls, coordinator=None, num_processes=None, process_id=None) -> "ProcessGroup | None":
    """Arguments first, then DFJAX_COORDINATOR / DFJAX_NUM_PROCESSES / DFJAX_PROCESS_ID; None if unset."""
    given = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    env = {"coordinator": ENV_COORDINATOR, "num_processes": ENV_NUM_PROCESSES, "process_id": ENV_PROCESS_ID}
    found = {name: (value, name) if value is not None else (os.environ.get(env[name]), env[name])
             for name, value in given.items()}  # (value, where it came from: the error names it)
    if all(value is None for value, _ in found.values()):
      return None
    missing = [name for name, (value, _) in found.items() if value is None]
    if missing:
      raise ValueError(f"a multi-process run needs coordinator, num_processes and process_id; missing "
                       f"{missing} (flags or {ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}).")
    count, index = (_integer(*found[name]) for name in ("num_processes", "process_id"))
    return cls(str(found["coordinator"][0]), count, index)


def _integer(value, source: str) -> int:
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{source}={value!r} must be an integer.") from None


def initialize(group: ProcessGroup | None, *, timeout_s: float = 60) -> None:
  """Joins the process group (no-op for None), raising instead of letting JAX abort where it can.

  Raises ConnectionError when process 0 is unreachable, when not every process joins within
  `timeout_s`, or when the coordinator port is answered by something that is not a dfjax process 0;
  ValueError when two processes share an id or the processes disagree on the process count.
  """
  if group is None or group.num_processes == 1:
    return
  if group.process_id == 0:
    print(f"dfjax: coordinating {group.num_processes} processes at {group.coordinator} "
          f"(waiting up to {timeout_s:g} s for them to join)", file=sys.stderr)
    _gather(group, timeout_s)
  else:
    _join(group, timeout_s)
    # Wait until JAX's service listens, so that its client need not back off.
    _connect(group, timeout_s, "process 0 checked every process in but its JAX service did not start "
             "listening (did process 0 exit? see its output)").close()
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  # JAX aborts a few seconds after its own timeout; say why first (everyone had checked in, so a
  # process must have exited since, or the port is blocked for JAX's traffic).
  explain = threading.Timer(timeout_s, print, [
      f"dfjax: all {group.num_processes} processes checked in at {group.coordinator}, but JAX's runtime "
      f"has not connected within {timeout_s:g} s: a process has exited or the network blocks the port; "
      f"JAX will abort this process."], {"file": sys.stderr, "flush": True})
  explain.daemon = True
  explain.start()
  try:
    jax.distributed.initialize(group.coordinator, group.num_processes, group.process_id,
                               initialization_timeout=max(1, round(timeout_s)))
  finally:
    explain.cancel()


def _gather(group: ProcessGroup, timeout_s: float) -> None:
  """Process 0: waits for ids 1 … n−1 with the same count, then answers everyone (ok or the error)."""
  deadline = time.monotonic() + timeout_s
  port = int(group.coordinator.rpartition(":")[2])
  try:  # every address, as JAX's service binds it
    server = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True) \
        if socket.has_dualstack_ipv6() else socket.create_server(("", port))
  except OSError as error:
    raise ConnectionError(
        f"process 0 cannot listen on port {port} ({os.strerror(error.errno)}): another program, or another "
        f"process started with process id 0, holds it; pick a free port for --coordinator.") from None
  peers, joined = [], set()  # every dfjax process that checked in hears the verdict
  try:
    with server:
      while len(joined) < group.num_processes - 1:
        if (remaining := deadline - time.monotonic()) <= 0:
          missing = sorted(set(range(1, group.num_processes)) - joined)
          raise ConnectionError(
              f"process 0 waited {timeout_s:g} s at {group.coordinator} but process(es) {missing} of "
              f"{group.num_processes} did not join: start them with the same coordinator and count "
              f"within {timeout_s:g} s of process 0.")
        server.settimeout(remaining)
        try:
          peer, _ = server.accept()
          peer.sendall(f"{_GREETING}\n".encode())
        except OSError:  # the wait is over (checked above) or a port probe hung up at once
          continue
        with peer.makefile("rb") as stream:
          words = (_read_line(stream, peer, time.monotonic() + _HELLO_WAIT_S) or "").split()
        if len(words) != 3 or words[0] != _JOIN or not all(w.isdigit() for w in words[1:]):
          peer.close()  # a port probe or a stranger, not a dfjax process: ignore it
          continue
        peers.append(peer)
        process_id, count = int(words[1]), int(words[2])
        if count != group.num_processes:
          raise ValueError(f"process {process_id} was started with num_processes={count} but process 0 with "
                           f"{group.num_processes}: give every process the same count.")
        if process_id in joined:
          raise ValueError(f"two processes were started with process id {process_id}: give each of the "
                           f"{group.num_processes} processes its own id in 0 … {group.num_processes - 1}.")
        joined.add(process_id)
    _answer(peers, "ok")
  except (ValueError, ConnectionError) as error:
    _answer(peers, f"{type(error).__name__} {error}")
    raise


def _answer(peers: list[socket.socket], line: str) -> None:
  """Sends process 0's verdict, then lets each peer hang up first (the port stays free to reuse)."""
  for peer in peers:
    with peer:
      try:
        peer.sendall(f"{line}\n".encode())
        peer.settimeout(_HELLO_WAIT_S)
        peer.recv(1)
      except OSError:  # that peer is gone already: nothing to tell it
        pass


def _join(group: ProcessGroup, timeout_s: float) -> None:
  """Any other process: checks in with process 0 and raises what it answers if that is not ok."""
  # Buffered reads: the greeting and the verdict may arrive in one packet.
  with _connect(group, timeout_s) as peer, peer.makefile("rb") as stream:
    peer.sendall(f"{_JOIN} {group.process_id} {group.num_processes}\n".encode())
    greeting = _read_line(stream, peer, time.monotonic() + timeout_s)
    if greeting != _GREETING:
      heard = "nothing" if greeting is None else repr(greeting[:60])
      raise ConnectionError(
          f"the coordinator port {group.coordinator} answered, but not as a dfjax process 0 (it sent "
          f"{heard}): another program listens there; start process 0 on a free port and point "
          f"every process at it.")
    # Process 0 answers within its timeout of our joining (sooner if it started before us).
    verdict = _read_line(stream, peer, time.monotonic() + timeout_s + _HELLO_WAIT_S)
  if verdict == "ok":
    return
  kind, _, message = (verdict or "").partition(" ")
  if kind in _ERRORS:
    raise _ERRORS[kind](f"process 0 stopped the start-up: {message}")
  raise ConnectionError(f"process 0 at {group.coordinator} hung up before all {group.num_processes} "
                        f"processes had joined (did it exit? see its output).")


def _connect(group: ProcessGroup, timeout_s: float, failure: str = "") -> socket.socket:
  """The coordinator port, retried for `timeout_s`; then ConnectionError saying `failure` (or how to fix)."""
  host, _, port = group.coordinator.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      return socket.create_connection((host.strip("[]"), int(port)), timeout=1)
    except OSError as error:
      if time.monotonic() > deadline:
        failure = failure or ("check that process 0 runs and that the address and port are reachable "
                              "from this host")
        raise ConnectionError(
            f"process {group.process_id} of {group.num_processes} could not reach the coordinator at "
            f"{group.coordinator} within {timeout_s:g} s: {failure} ({error}).") from None
      time.sleep(0.05)


def _read_line(stream, peer: socket.socket, deadline: float) -> str | None:
  """One newline-ended UTF-8 line from `stream` (peer's makefile), or None on hang-up, timeout or junk."""
  peer.settimeout(max(deadline - time.monotonic(), 1e-3))
  try:
    line = stream.readline(4096)
    return line.decode().removesuffix("\n") if line.endswith(b"\n") else None
  except (OSError, UnicodeDecodeError):  # timeout or reset; bytes that are not text
    return None
