"""Writing a folder so that it is either complete or absent, whatever happens meanwhile.

`write_atomically` writes into a hidden sibling `.NAME.tmp-PID-TAG` and renames it into place;
the folder it replaces waits aside as `.NAME.old-PID-TAG` until the new one is in place.

- SIGINT/SIGTERM during the write are held (`signals_deferred`) until the writers, orbax's
  background threads included, have finished; then the unfinished folder is removed and the
  signal is delivered as it would have been (KeyboardInterrupt, or termination).
- A failure the operating system reports (disk full, permission denied…) becomes one OSError line
  naming the destination; orbax's and TensorStore's many thread tracebacks about it are dropped.
- What `kill -9` leaves (`.NAME.tmp-*`, `.NAME.old-*` of a dead process) is removed by the next
  write to NAME (`prepare_destination`), and a replaced folder caught aside is put back.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from convert.format import FORMAT, MANIFEST, is_checkpoint

log = logging.getLogger(__name__)

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_WRITER_LOGGER = "absl"  # orbax logs each failed thread's traceback through absl
_OS_ERROR_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")  # how TensorStore reports errno


def prepare_destination(dst: str | os.PathLike, overwrite: bool) -> Path:
  """The folder to write for `dst`, after cleaning up what interrupted writes to it left.

  A symlink stands for the folder it points to: that folder is replaced and the link kept.
  Args:
    dst: the destination folder (or a symlink to it).
    overwrite: whether an existing dfjax checkpoint (or empty folder) there may be replaced.
  Raises:
    FileExistsError: `dst` exists and `overwrite` is False, or it is not a dfjax checkpoint.
    FileNotFoundError: `dst` is a symlink to nothing.
  """
  dst = Path(dst)
  target = _real(dst)
  if dst.is_symlink() and not target.exists():
    raise FileNotFoundError(f"{dst} is a symlink to {target}, which does not exist; create that "
                            "folder or remove the link")
  remove_stale(target)
  if not target.exists():
    return target
  if not overwrite:
    raise FileExistsError(f"{dst} already exists; pass overwrite=True (CLI: --overwrite) to replace it")
  if not is_checkpoint(target) and not (target.is_dir() and not any(target.iterdir())):
    raise FileExistsError(f"{dst} exists and is not a dfjax checkpoint (no {MANIFEST} of format "
                          f"{FORMAT!r}); refusing to replace it, remove it yourself if meant")
  return target


def write_atomically(dst: Path, write: Callable[[Path], None], *, size_bytes: int = 0) -> None:
  """Runs `write(tmp)` on a fresh hidden sibling of `dst`, then renames it to `dst`.

  An existing `dst` is renamed aside and deleted once the new folder is in place (renamed back if
  the swap fails). On any error or signal the temporary folder is removed, after the writers
  stopped.
  Args:
    dst: the folder to write (as `prepare_destination` returned it).
    write: fills the empty folder it is given.
    size_bytes: about how much `write` writes, to refuse at once when the disk has less free.
  Raises:
    OSError: one line, "<reason> while writing DST; nothing was written", when the operating
      system refused a write (the error the writer raised is its cause).
  """
  dst = _real(Path(dst))
  tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
  tmp, old = (dst.with_name(f".{dst.name}.{kind}-{tag}") for kind in ("tmp", "old"))
  with signals_deferred(f"finishing the writes under way, then removing {tmp.name}; {dst} is "
                        "left as it was") as pending:
    try:
      with _writer_output_held() as output:
        try:
          dst.parent.mkdir(parents=True, exist_ok=True)
          if size_bytes > (free := shutil.disk_usage(dst.parent).free):
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({size_bytes / 1e6:.0f} MB to write, "
                          f"{free / 1e6:.0f} MB free)")
          tmp.mkdir()
          write(tmp)
        except BaseException as error:
          _settle(tmp, output)  # writer threads still finishing what they had started
          if (code := _os_error_code(error)) is not None:
            output.drop()
            reason = error.strerror if isinstance(error, OSError) and error.strerror else os.strerror(code)
            raise OSError(code, f"{reason} while writing {dst}; nothing was written") from error
          raise
      if not pending:
        _swap(tmp, dst, old)
    finally:
      _remove(tmp)
  if pending:  # held signal whose handler neither raised nor ended the process
    raise InterruptedError(f"interrupted by {signal.Signals(pending[0]).name}; nothing was written to {dst}")


@contextlib.contextmanager
def signals_deferred(notice: str) -> Iterator[list[int]]:
  """Holds SIGINT and SIGTERM inside the block; delivers the first one held on leaving it.

  Yields the list of signals held so far (empty while none came), so the block can give up its
  work early. A second signal only repeats the notice. Signals that were ignored stay ignored;
  outside the main thread (where Python cannot handle signals) the block runs as it is.
  """
  if threading.current_thread() is not threading.main_thread():
    yield []
    return
  pending: list[int] = []

  def hold(signum, frame):
    pending.append(signum)
    os.write(2, f"{signal.Signals(signum).name}: {notice}\n".encode())  # print() is not reentrant

  previous = {s: h for s in _SIGNALS if (h := signal.getsignal(s)) not in (signal.SIG_IGN, None)}
  for s in previous:
    signal.signal(s, hold)
  try:
    yield pending
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
    if pending:
      signal.raise_signal(pending[0])


def remove_stale(dst: Path) -> None:
  """Removes the temporary and set-aside siblings of `dst` that no live process owns.

  A set-aside `.NAME.old-*` with no `dst` is the previous folder of a swap cut short: it is put
  back rather than removed. Each action is logged on one line.
  """
  pattern = re.compile(rf"\.{re.escape(dst.name)}\.(tmp|old)-(?:(\d+)-)?[0-9a-f]{{8}}")
  found = [(m[1], m[2], p) for p in dst.parent.glob(f".{dst.name}.*-*") if (m := pattern.fullmatch(p.name))]
  for kind, pid, path in sorted(found, key=lambda f: f[0] != "old"):
    if pid is not None and _alive(int(pid)):
      continue
    if kind == "old" and not dst.exists():
      os.replace(path, dst)
      log.warning("restored %s from %s, left aside by an interrupted write", dst, path.name)
    else:
      _remove(path)
      log.warning("removed %s, left by an interrupted write of %s", path, dst.name)


# ---------------------------------------------------------------------------------- helpers

def _real(path: Path) -> Path:
  """`path` absolute, and resolved when it is a symlink (so the folder it names is replaced)."""
  return path.resolve() if path.is_symlink() else path.absolute()


def _swap(tmp: Path, dst: Path, old: Path) -> None:
  if not dst.exists():
    os.replace(tmp, dst)
    return
  os.replace(dst, old)
  try:
    os.replace(tmp, dst)
  except BaseException:
    os.replace(old, dst)
    raise
  try:
    shutil.rmtree(old)
  except OSError as e:  # the new folder is in place: a leftover is no failure of the write
    log.warning("wrote %s, but could not remove the folder it replaced, %s (%s); the next write "
                "removes it, or remove it yourself", dst, old, e)


def _remove(path: Path) -> None:
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  elif path.exists() or path.is_symlink():
    path.unlink()


def _alive(pid: int) -> bool:
  """Whether process `pid` runs on this machine (this process's own leftovers are stale: one
  process writes one destination at a time)."""
  if pid == os.getpid():
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # someone else's process
    return True
  return True


def _os_error_code(error: BaseException) -> int | None:
  """The errno behind `error` or any exception it came from, also as TensorStore words it."""
  while error is not None:
    if isinstance(error, OSError) and error.errno:
      return error.errno
    if (m := _OS_ERROR_CODE.search(str(error))) or "No space left on device" in str(error):
      return int(m[1]) if m else errno.ENOSPC
    error = error.__cause__ or error.__context__
  return None


def _settle(folder: Path, output: _HeldOutput, *, quiet_s: float = 0.3, limit_s: float = 10.0) -> None:
  """Waits (up to `limit_s`) until nothing changes in `folder` nor is printed for `quiet_s`: after
  a failed write, TensorStore completes the writes it had started, and only then may `folder` go."""
  def state():
    files = [f.stat().st_size for f in folder.rglob("*") if f.is_file()] if folder.exists() else []
    return len(files), sum(files), output.size()
  began, last, since = time.monotonic(), state(), time.monotonic()
  while time.monotonic() - since < quiet_s and time.monotonic() - began < limit_s:
    time.sleep(quiet_s / 5)
    if (now := state()) != last:
      last, since = now, time.monotonic()


class _HeldOutput(logging.Filter):
  """What the writers print on stderr or log through absl while held: passed on when released,
  unless dropped (their words about a failure already reported in one line)."""

  def __init__(self):
    super().__init__()
    self.records: list[logging.LogRecord] = []
    self.stderr = io.StringIO()
    self.dropped = False

  def filter(self, record: logging.LogRecord) -> bool:
    self.records.append(record)
    return False

  def size(self) -> int:
    return len(self.records) + self.stderr.tell()

  def drop(self) -> None:
    self.dropped = True


@contextlib.contextmanager
def _writer_output_held() -> Iterator[_HeldOutput]:
  held, logger = _HeldOutput(), logging.getLogger(_WRITER_LOGGER)
  logger.addFilter(held)
  try:
    with contextlib.redirect_stderr(held.stderr):
      yield held
  finally:
    logger.removeFilter(held)
    if not held.dropped:
      sys.stderr.write(held.stderr.getvalue())
      for record in held.records:
        logger.handle(record)
