"""Interrupted, failed and unusual writes leave nothing behind: SIGINT/SIGTERM during `dfjax
convert` (a ~50 MB model, in a subprocess) and `dfjax train`'s checkpoints, what `kill -9` left,
a full disk, and `--overwrite` onto a symlink."""

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import orbax.checkpoint as ocp
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import convert.atomic as atomic  # noqa: E402
from convert import convert_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
            sample_size=16, attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
# ~51 MB of float32 weights: big enough that the write takes a while.
BIG = dict(TINY, block_out_channels=(64, 128, 256), norm_num_groups=32, cross_attention_dim=256,
           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """{"tiny": diffusers UNet folder, "big": a ~50 MB one}, random weights."""
  root = tmp_path_factory.mktemp("sources")
  torch.manual_seed(0)
  for name, config in (("tiny", TINY), ("big", BIG)):
    diffusers.UNet2DConditionModel(**config).save_pretrained(root / name)
  return {"tiny": root / "tiny", "big": root / "big"}


@pytest.fixture
def old(sources, tmp_path):
  """An existing checkpoint (of the tiny model) at tmp_path/out/ckpt, to be left untouched."""
  return convert_checkpoint(sources["tiny"], tmp_path / "out" / "ckpt")


def _contents(folder: Path) -> dict[str, str]:
  return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.rglob("*")) if p.is_file()}


def _siblings(folder: Path) -> list[str]:
  return sorted(p.name for p in folder.parent.iterdir())


def _dead_pid() -> int:
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


# ---------------------------------------------------------------------------------- signals

def _moment_reached(dst: Path, moment: str) -> bool:
  """Whether the conversion writing `dst` reached `moment` of its write."""
  tmps = list(dst.parent.glob(f".{dst.name}.tmp-*"))
  if not tmps:
    return False
  return {"folder made": True,
          "orbax writing": any(tmps[0].glob("params*")),
          "params written": (tmps[0] / "params").is_dir()}[moment]


def _convert_interrupted(src: Path, dst: Path, signum: int, moment: str) -> subprocess.CompletedProcess:
  """Runs `python -m dfjax convert SRC DST --overwrite`, sending `signum` once `moment` is reached."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  # SIGINT at its default in the child: a test run started in the background by a shell (`pytest &`) ignores
  # SIGINT, and an ignored disposition is inherited across exec, so the conversion would never see it.
  proc = subprocess.Popen([sys.executable, "-m", "dfjax", "--cpu-devices", "1", "convert", str(src), str(dst),
                           "--overwrite"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  while proc.poll() is None and not _moment_reached(dst, moment):
    time.sleep(0.002)
  proc.send_signal(signum)
  out, err = proc.communicate(timeout=300)
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _check_interrupted(result, old: Path, before: dict, signum: int) -> None:
  assert result.returncode != 0, (result.stdout, result.stderr[-3000:])  # the signal came before the end
  assert f"{signal.Signals(signum).name}: finishing the writes under way" in result.stderr
  assert _siblings(old) == ["ckpt"]  # no .ckpt.tmp-* / .ckpt.old-* left
  assert _contents(old) == before  # the destination untouched


def test_sigint_while_orbax_writes(sources, old):
  before = _contents(old)
  result = _convert_interrupted(sources["big"], old, signal.SIGINT, "orbax writing")
  _check_interrupted(result, old, before, signal.SIGINT)
  assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "dfjax convert: interrupted; no checkpoint was left half-written" in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["folder made", "orbax writing", "params written"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signals_at_each_moment_of_the_write(sources, old, signum, moment):
  before = _contents(old)
  result = _convert_interrupted(sources["big"], old, signum, moment)
  _check_interrupted(result, old, before, signum)
  if signum == signal.SIGTERM:
    assert result.returncode == -signal.SIGTERM  # then ends as SIGTERM does


@pytest.mark.slow
def test_kill_9_leftovers_removed_by_the_next_run(sources, old, caplog):
  before = _contents(old)
  result = _convert_interrupted(sources["big"], old, signal.SIGKILL, "orbax writing")
  assert result.returncode == -signal.SIGKILL
  left = [name for name in _siblings(old) if name != "ckpt"]
  assert left and left[0].startswith(".ckpt.tmp-")
  assert _contents(old) == before
  with caplog.at_level(logging.WARNING, logger="convert.atomic"):
    convert_checkpoint(sources["tiny"], old, overwrite=True)
  assert _siblings(old) == ["ckpt"]
  assert [r.getMessage() for r in caplog.records if r.name == "convert.atomic"] == [
      f"removed {old.parent / left[0]}, left by an interrupted write of ckpt"]


@pytest.mark.slow
def test_sigterm_during_training_checkpoints(tmp_path):
  """SIGTERM while `dfjax train` checkpoints every step: the manager finishes its write and exits
  143; no orbax temporary folder is left, and every step folder left is complete."""
  out = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, "-m", "dfjax", "--cpu-devices", "1", "train", "--out", str(out),
                           "--model", "tiny", "--steps", "50", "--batch", "2", "--save-every", "1",
                           "--log-every", "1", "--warmup-steps", "1"],
                          cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  checkpoints = out / "checkpoints"
  while proc.poll() is None and not any(checkpoints.glob("*.orbax-checkpoint-tmp*")):
    time.sleep(0.002)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
  steps = sorted(p for p in checkpoints.iterdir())
  assert steps and all(p.name.isdigit() for p in steps), [p.name for p in steps]
  assert all((p / "_CHECKPOINT_METADATA").is_file() for p in steps)
  assert not (out / "model").exists()


# ---------------------------------------------------------------------------------- leftovers

def test_stale_siblings_of_dead_processes_removed_live_ones_kept(sources, old, caplog):
  dead, live = _dead_pid(), os.getppid()
  for name in (f".ckpt.tmp-{dead}-0123abcd", f".ckpt.old-{dead}-0123abcd", ".ckpt.tmp-89abcdef",
               f".ckpt.tmp-{live}-00000000"):
    (old.parent / name).mkdir()
    (old.parent / name / "junk").write_bytes(b"x" * 100)
  with caplog.at_level(logging.WARNING, logger="convert.atomic"):
    convert_checkpoint(sources["tiny"], old, overwrite=True)
  assert _siblings(old) == [f".ckpt.tmp-{live}-00000000", "ckpt"]  # a live writer's folder is its own
  notices = [r.getMessage() for r in caplog.records if r.name == "convert.atomic"]
  assert len(notices) == 3 and all("left by an interrupted write of ckpt" in n for n in notices)
  assert all("\n" not in n for n in notices)


def test_swap_cut_short_puts_the_old_checkpoint_back(sources, old, caplog):
  """kill -9 between the two renames of a swap leaves the old checkpoint aside and no destination:
  the next write restores it (and so refuses to replace it without overwrite)."""
  before = _contents(old)
  aside = old.with_name(f".ckpt.old-{_dead_pid()}-0123abcd")
  os.replace(old, aside)
  shutil.copytree(aside, old.with_name(f".ckpt.tmp-{_dead_pid()}-4567abcd"))
  with caplog.at_level(logging.WARNING, logger="convert.atomic"), pytest.raises(FileExistsError,
                                                                                match="already exists"):
    convert_checkpoint(sources["tiny"], old)
  assert _siblings(old) == ["ckpt"] and _contents(old) == before
  assert any(r.getMessage().startswith(f"restored {old} from .ckpt.old-") for r in caplog.records)


# ---------------------------------------------------------------------------------- disk full

def _noisy_disk_full(error: BaseException):
  """A StandardCheckpointer.save that fails as a full disk does, chattering as orbax's threads do."""
  def save(self, *args, **kwargs):
    for _ in range(50):
      print("Traceback (most recent call last):\nRuntimeError: Event loop is closed", file=sys.stderr)
      logging.getLogger("absl").error("_SignalingThread.run() raised an exception")
    raise error
  return save


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    ValueError('RESOURCE_EXHAUSTED: Error writing "a/0" in OCDBT database: Failed to write 1096482 bytes to '
               "file 4: No space left on device [os_error_code='28']"),
], ids=["OSError", "TensorStore"])
def test_disk_full_is_one_line_and_writes_nothing(sources, old, monkeypatch, capsys, error):
  before = _contents(old)
  monkeypatch.setattr(ocp.StandardCheckpointer, "save", _noisy_disk_full(error))
  capsys.readouterr()
  with pytest.raises(OSError) as info:
    convert_checkpoint(sources["tiny"], old, overwrite=True)
  assert info.value.errno == errno.ENOSPC
  assert str(info.value) == (f"[Errno 28] No space left on device while writing {old}; nothing was "
                             "written")
  assert capsys.readouterr().err == ""  # the writers' tracebacks are not passed on
  assert _siblings(old) == ["ckpt"] and _contents(old) == before


def test_not_enough_free_space_refused_before_writing(sources, tmp_path, monkeypatch):
  monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1000))
  dst = tmp_path / "new"
  with pytest.raises(OSError, match=f"No space left on device \\(\\d+ MB to write, 0 MB free\\) while "
                                    f"writing {dst}; nothing was written"):
    convert_checkpoint(sources["tiny"], dst)
  assert os.listdir(tmp_path) == []


def test_other_writer_errors_keep_their_output(sources, tmp_path, monkeypatch, capsys):
  def save(self, *args, **kwargs):
    print("orbax says why", file=sys.stderr)
    raise RuntimeError("a bug in a writer")
  monkeypatch.setattr(ocp.StandardCheckpointer, "save", save)
  with pytest.raises(RuntimeError, match="a bug in a writer"):
    convert_checkpoint(sources["tiny"], tmp_path / "new")
  assert "orbax says why" in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------- symlinks

def _source_path(ckpt: Path) -> str:
  return json.loads((ckpt / "manifest.json").read_text())["source"]["path"]


def test_overwrite_through_a_symlink_replaces_its_target(sources, old, tmp_path):
  link, other = tmp_path / "link", Path(shutil.copytree(sources["tiny"], tmp_path / "other"))
  link.symlink_to(old)
  assert _source_path(old) == str(sources["tiny"].resolve())
  assert convert_checkpoint(other, link, overwrite=True) == link
  assert link.is_symlink() and link.resolve() == old
  assert _source_path(old) == str(other.resolve())
  assert _siblings(old) == ["ckpt"] and sorted(os.listdir(tmp_path)) == ["link", "other", "out"]
  with pytest.raises(FileExistsError, match="already exists"):
    convert_checkpoint(sources["tiny"], link)


def test_symlink_to_nothing_refused(sources, tmp_path):
  link = tmp_path / "link"
  link.symlink_to(tmp_path / "missing")
  with pytest.raises(FileNotFoundError, match="is a symlink to .*missing, which does not exist"):
    convert_checkpoint(sources["tiny"], link, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["link"]


def test_old_copy_that_cannot_be_removed_is_no_failure(sources, old, tmp_path, monkeypatch, caplog):
  other, real_rmtree = Path(shutil.copytree(sources["tiny"], tmp_path / "other")), shutil.rmtree

  def rmtree(path, *args, **kwargs):
    if ".ckpt.old-" in str(path):
      raise PermissionError(errno.EACCES, "Permission denied", str(path))
    real_rmtree(path, *args, **kwargs)
  monkeypatch.setattr(atomic.shutil, "rmtree", rmtree)
  with caplog.at_level(logging.WARNING, logger="convert.atomic"):
    convert_checkpoint(other, old, overwrite=True)  # returns: the new checkpoint is in place
  assert _source_path(old) == str(other.resolve())
  assert any("could not remove the folder it replaced" in r.getMessage() for r in caplog.records)
