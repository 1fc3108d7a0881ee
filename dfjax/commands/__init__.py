"""The `dfjax` command: convert | generate | bench | train. Each subcommand is a thin wrapper.

`main(argv)` is the console script (`dfjax …`) and `python -m dfjax …`; `build_parser()` gives the
parser, one module of this package per command family adding its subcommand.
"""

from __future__ import annotations

import argparse
import errno
import shlex
import sys

import jax

from dfjax.commands import bench, convert, generate, train
from sharding.distributed import ProcessGroup, initialize

# What the user can fix: bad values, and every OSError (missing, existing or unwritable paths, a file
# where a folder is expected, a full disk, an unreachable coordinator). Anything else is a bug and keeps
# its traceback.
_BAD_INPUT = (ValueError, OSError, FloatingPointError)
_OS_FIXES = {
    errno.EACCES: "choose a location you may write to (or read, for an input) or change its permissions",
    errno.EPERM: "choose a location you may write to or change its permissions",
    errno.EROFS: "the file system is read-only: choose a writable location",
    errno.ENOTDIR: "a file is where a folder is expected: move it away or choose another path",
    errno.EISDIR: "a folder is where a file is expected: choose a file path",
    errno.ENOSPC: "free some space or choose another disk",
}


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="dfjax",
                                   description="The `dfjax` command: convert | generate | bench | train.")
  parser.add_argument("--cpu-devices", type=int, default=8,
                      help="virtual devices to split the CPU into when there is no accelerator (default 8)")
  processes = parser.add_argument_group(
      "multi-process runs (or DFJAX_COORDINATOR, DFJAX_NUM_PROCESSES, DFJAX_PROCESS_ID)")
  processes.add_argument("--coordinator", help="host:port of process 0's coordination service")
  processes.add_argument("--num-processes", type=int, help="number of processes in the run")
  processes.add_argument("--process-id", type=int, help="this process's index, 0 … num-processes−1")
  commands = parser.add_subparsers(dest="command", required=True)
  for family in (convert, bench, generate, train):
    family.register(commands)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Runs one `dfjax` command; 0 on success, 2 (with `dfjax CMD: error: …` on stderr) on bad input."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = build_parser().parse_args(argv)
  args.command_line = shlex.join(["dfjax", *argv])
  _use_cpu_devices(getattr(args, "devices", None) or args.cpu_devices)
  try:
    initialize(ProcessGroup.from_env(args.coordinator, args.num_processes, args.process_id))
    args.run(args)
  except _BAD_INPUT as error:  # bad input: what and how to fix
    print(f"dfjax {_command(args)}: error: {error_message(error)}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:  # the writers have finished and cleaned up (convert/atomic.py) before it arrives
    print(f"dfjax {_command(args)}: interrupted; no checkpoint was left half-written", file=sys.stderr)
    return 130
  return 0


def _command(args) -> str:
  return " ".join(filter(None, (args.command, getattr(args, "bench", None))))  # e.g. "bench fidelity"


def error_message(error: Exception) -> str:
  """The error's own text; for an OSError from the system, its reason, its path(s) and the usual fix."""
  if not isinstance(error, OSError) or error.strerror is None:
    return str(error)
  paths = " → ".join(repr(str(f)) for f in (error.filename, error.filename2) if f is not None)
  fix = _OS_FIXES.get(error.errno)
  return f"{error.strerror}{f': {paths}' if paths else ''}{f' ({fix})' if fix else ''}"


def _use_cpu_devices(count: int) -> None:
  """Splits the host CPU into `count` virtual devices; only the CPU backend reads it."""
  if count < 1:
    raise SystemExit(f"dfjax: --cpu-devices={count} must be at least 1")
  try:
    jax.config.update("jax_num_cpu_devices", count)
  except RuntimeError:  # jax already started in this process (main() called from Python): keep its devices
    pass
