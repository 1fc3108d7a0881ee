"""The `dfjax` command's plumbing: subcommands run end to end and bad input exits cleanly."""

import argparse
import dataclasses
import errno
import json
import os

import pytest

from dfjax import commands
from dfjax.bench import strategies
from dfjax.bench.timing import device_name
from dfjax.bench.fidelity import FidelityConfig
from dfjax.commands import convert
from dfjax.commands.options import Flag, add_config_arguments, config_from_args
from dfjax.generation import GenerateConfig
from dfjax.training.loop import TrainConfig
from sharding.axes import PATCH
from sharding.strategies import Strategy, base

TWO_LEVEL_UNET = {
    "block_out_channels": [32, 64], "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 4,
    "cross_attention_dim": 32, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}


@pytest.mark.slow  # 59 s; HLO = analytic per strategy stays in the default run (test_strategies, test_sequence)
def test_bench_strategies_measures_traffic_and_stale_memory_equal_to_analytic(tmp_path, capsys, returned):
  config = tmp_path / "config.json"
  config.write_text(json.dumps(TWO_LEVEL_UNET))
  runs = returned(strategies, "run")
  code = commands.main(["bench", "strategies", "--config", str(config), "--resolution", "128", "--patch",
                        "2", "--num-steps", "3", "--warmup-steps", "1", "--iters", "1"])
  assert code == 0
  out = capsys.readouterr().out
  assert "comm MiB/step" in out and f"on {device_name()}" in out  # the table is printed, the machine named
  by_name = {run.strategy: run for run in runs[0]}
  assert list(by_name) == ["single", "exact", "displaced", "naive", "ulysses", "ring", "asyncdiff"]
  assert by_name["exact"].patch == 2 and "stage=2" in by_name["asyncdiff"].mesh
  assert "asyncdiff on cfg=1×stage=2×patch=1: N2S1: components start at" in out  # the cut, per-component FLOPs
  assert "pipefusion" not in by_name  # it runs DiT and PixArt only (its `families`), so a UNet never tries it
  # each asyncdiff device holds its component's params, not the model
  assert 0 < by_name["asyncdiff"].param_bytes < by_name["single"].param_bytes
  for name in ("exact", "displaced", "asyncdiff"):  # bytes read from the compiled program == the analytic figure
    assert by_name[name].comm_bytes == by_name[name].analytic_bytes > 0
    assert by_name[name].stale_bytes == by_name[name].analytic_stale_bytes
  assert by_name["displaced"].stale_bytes > 0 and by_name["exact"].stale_bytes == 0
  assert by_name["naive"].comm_bytes == by_name["single"].comm_bytes == 0


def test_bad_input_exits_with_a_message_not_a_traceback(tmp_path, capsys):
  assert commands.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
  assert "dfjax convert: error:" in capsys.readouterr().err
  assert not (tmp_path / "out").exists()
  assert commands.main(["bench", "unet", "--config", "no-such-preset", "--no-torch"]) == 2
  assert "preset" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    commands.main(["bench", "strategies", "--cfg", "3"])


def test_strategy_choices_and_help_come_from_the_registry(monkeypatch, capsys):
  """A strategy registered after import is a --strategy choice, listed with its description."""
  monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # the toy leaves the registry with the test
  monkeypatch.setattr(Strategy, "toy", None, raising=False)  # and its constructor on Strategy

  class Toy(Strategy):
    name = "toy"
    description = "a strategy this test registers"
    axes = frozenset({PATCH})
    method_axis = PATCH  # its method splits rows: bench simulate offers it too

  parser = commands.build_parser()
  assert parser.parse_args(["generate", "--strategy", "single", "toy"]).strategies == ["single", "toy"]
  assert parser.parse_args(["bench", "simulate", "--strategies", "toy"]).strategies == ["toy"]
  with pytest.raises(SystemExit):
    parser.parse_args(["generate", "--help"])
  help_text = " ".join(capsys.readouterr().out.split())
  assert "toy: a strategy this test registers" in help_text
  assert "displaced: DistriFusion:" in help_text


@pytest.mark.parametrize("argv,expected", [
    (["generate"], GenerateConfig()),
    (["bench", "fidelity"], FidelityConfig()),
    (["train", "--out", "run"], TrainConfig(out="run")),
], ids=["generate", "bench fidelity", "train"])
def test_flag_defaults_are_the_config_defaults(argv, expected):
  assert config_from_args(type(expected), commands.build_parser().parse_args(argv)) == expected


def test_flags_are_named_as_the_python_api_and_old_spellings_still_work():
  parser = commands.build_parser()
  new = parser.parse_args(["generate", "--guidance-scale", "3", "--num-steps", "7", "--strategies", "single"])
  old = parser.parse_args(["generate", "--guidance", "3", "--steps", "7", "--strategy", "single"])
  expected = GenerateConfig(guidance_scale=3.0, steps=7, strategies=("single",))
  assert config_from_args(GenerateConfig, new) == config_from_args(GenerateConfig, old) == expected
  fidelity_args = parser.parse_args(["bench", "fidelity", "--guidance", "2", "--steps", "5", "--patch", "2"])
  expected = FidelityConfig(guidance_scale=2.0, steps=5, patch=(2,))
  assert config_from_args(FidelityConfig, fidelity_args) == expected
  for flag in ("--constant-lr", "--no-cosine"):
    assert not config_from_args(TrainConfig, parser.parse_args(["train", "--out", "run", flag])).cosine
  assert parser.parse_args(["bench", "strategies", "--steps", "3"]).num_steps == 3


def test_a_config_field_without_a_flag_is_caught_when_the_parser_is_built():
  @dataclasses.dataclass(frozen=True)
  class Settings:
    size: int = 1
    names: tuple[str, ...] = ("a",)

  with pytest.raises(TypeError, match="must describe exactly its fields"):
    add_config_arguments(argparse.ArgumentParser(), Settings, {"size": Flag("side")})
  parser = argparse.ArgumentParser()
  add_config_arguments(parser, Settings, {"size": Flag("side"), "names": Flag("names")})
  assert config_from_args(Settings, parser.parse_args(["--names", "b", "c"])) == Settings(1, ("b", "c"))


# ---------------------------------------------------------------------------------- OS errors

def _one_error_line(capsys, command: str) -> str:
  err = capsys.readouterr().err
  assert err.startswith(f"dfjax {command}: error: ") and len(err.strip().splitlines()) == 1, err
  assert "Traceback" not in err
  return err


@pytest.fixture
def blocker(tmp_path):
  """A file where the commands below expect a folder."""
  path = tmp_path / "a-file"
  path.write_text("not a folder")
  return path


@pytest.mark.parametrize("argv,command", [
    (["train", "--out", "{blocker}/run", "--model", "tiny", "--steps", "1"], "train"),
    (["generate", "--strategies", "single", "--num-steps", "1", "--images", "1", "--out", "{blocker}/out"],
     "generate"),
    (["bench", "fidelity", "--seeds", "1", "--num-steps", "1", "--patch", "2", "--groupnorm", "sync",
      "--ablation-patch", "0", "--json", "{blocker}/fidelity.json"], "bench fidelity"),
], ids=["train --out", "generate --out", "bench fidelity --json"])
def test_a_file_where_a_folder_is_expected_is_a_one_line_error(argv, command, blocker, capsys):
  assert commands.main([arg.format(blocker=blocker) for arg in argv]) == 2
  err = _one_error_line(capsys, command)
  assert str(blocker) in err and "a file is where a folder is expected" in err
  assert blocker.read_text() == "not a folder"  # nothing written over it


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: chmod stops nothing")
def test_a_read_only_output_folder_is_a_one_line_error(tmp_path, capsys):
  folder = tmp_path / "read-only"
  folder.mkdir()
  folder.chmod(0o500)
  try:
    assert commands.main(["train", "--out", str(folder / "run"), "--model", "tiny", "--steps", "1"]) == 2
  finally:
    folder.chmod(0o700)
  err = _one_error_line(capsys, "train")
  assert "Permission denied" in err and str(folder) in err and not any(folder.iterdir())


@pytest.mark.parametrize("error,message", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/ckpt"),
     "Permission denied: '/data/ckpt' (choose a location you may write to"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/ckpt"),
     "Read-only file system: '/mnt/ro/ckpt' (the file system is read-only: choose a writable location)"),
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device (free some space"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/ckpt"), "a folder is where a file is expected"),
    (FileExistsError("/data/ckpt exists; pass --overwrite"), "/data/ckpt exists; pass --overwrite"),
])
def test_every_os_error_is_a_one_line_error_with_the_fix(error, message, monkeypatch, capsys):
  def failing(*args, **kwargs):
    raise error

  monkeypatch.setattr(convert, "convert_checkpoint", failing)
  assert commands.main(["convert", "src", "dst"]) == 2
  assert message in _one_error_line(capsys, "convert")


def test_a_bug_keeps_its_traceback(monkeypatch):
  def buggy(*args, **kwargs):
    raise TypeError("a bug, not bad input")

  monkeypatch.setattr(convert, "convert_checkpoint", buggy)
  with pytest.raises(TypeError, match="a bug"):
    commands.main(["convert", "src", "dst"])
