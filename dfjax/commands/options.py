"""Flags from where they are defined: config dataclasses, the strategy registry, GroupNorm modes.

`add_config_arguments` makes one flag per field of a settings dataclass (`GenerateConfig`,
`FidelityConfig`, `TrainConfig`): its type, nargs and default come from the field, so the
dataclass is the one source of defaults; only the help text (and an old spelling) is the
command's. Strategy names and descriptions come from the registry (`sharding.strategies`),
GroupNorm modes from `GroupNormMode`, so a new strategy or mode shows up in every command without
editing one.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence

from sharding.exchange.groupnorm import GroupNormMode
from sharding.strategies import option_names, strategy_class, strategy_names


@dataclasses.dataclass(frozen=True)
class Flag:
  """How one config field appears on the command line.

  Attributes:
    help: what it sets (the default is appended from the field).
    aliases: older spellings that still work, e.g. "--guidance" for --guidance-scale.
    name: the flag, when it differs from the field's name with dashes.
    choices, metavar: as in argparse.
  """

  help: str
  aliases: tuple[str, ...] = ()
  name: str | None = None
  choices: Sequence | None = None
  metavar: str | None = None


def add_config_arguments(parser, config_type: type, flags: Mapping[str, Flag]) -> None:
  """One flag per field of the dataclass `config_type`, described by `flags` (one entry per field).

  Type and default come from the field (see `add_flag`); a field without a default is required. The
  flag's dest is the field's name, so `config_from_args` builds the config back.
  """
  fields = dataclasses.fields(config_type)
  if set(flags) != {f.name for f in fields}:  # a new field without a flag (or a stale flag) is a bug here
    raise TypeError(f"flags for {config_type.__name__} must describe exactly its fields "
                    f"{[f.name for f in fields]}, got {sorted(flags)}")
  hints = typing.get_type_hints(config_type)
  for field in fields:
    required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    factory = None if field.default_factory is dataclasses.MISSING else field.default_factory
    default = factory() if factory else None if required else field.default
    add_flag(parser, field.name, hints[field.name], flags[field.name], default, required=required)


def add_flag(parser, dest: str, hint, flag: Flag, default, *, required: bool = False) -> None:
  """The flag of a value of type `hint`: `X | None` takes an X, `tuple[X, ...]` one or more, a bool
  becomes --name / --no-name; the default is appended to the help."""
  kind, several = _argument_type(hint)
  name = (flag.name or dest).replace("_", "-")
  names = [f"--{name}", *flag.aliases]
  shown = f"--{'' if default else 'no-'}{name}" if kind is bool else _shown(default)
  text = _escaped(flag.help + ("" if required or default is None else f" (default {shown})"))
  if kind is bool:
    parser.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=text)
    return
  parser.add_argument(*names, dest=dest, type=kind, nargs="+" if several else None, required=required,
                      default=list(default) if several and default is not None else default, choices=flag.choices,
                      metavar=flag.metavar, help=text)


def config_from_args(config_type: type, args: argparse.Namespace):
  """The `config_type` instance the flags of `add_config_arguments` parsed into `args`."""
  hints, values = typing.get_type_hints(config_type), {}
  for field in dataclasses.fields(config_type):
    value = getattr(args, field.name)
    several = _argument_type(hints[field.name])[1]
    values[field.name] = tuple(value) if several and value is not None else value  # argparse gives lists
  return config_type(**values)


def _argument_type(hint) -> tuple[type, bool]:
  """(the type one value is parsed as, whether the field takes several) of a field's type hint."""
  options = [t for t in typing.get_args(hint) if t is not type(None)]
  if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(options) == 1:
    hint = options[0]  # X | None
  if typing.get_origin(hint) is tuple:
    return typing.get_args(hint)[0], True
  return hint, False


def _shown(default) -> str:
  if isinstance(default, (tuple, list)):
    return " ".join(map(str, default))
  return f"{default:g}" if isinstance(default, float) else str(default)


def strategies_over(axis: str) -> str:
  """The registered strategies whose method splits an image over mesh `axis`, e.g. 'exact, displaced, naive'."""
  return ", ".join(n for n in strategy_names() if strategy_class(n).method_axis == axis)


def strategies_taking(option: str) -> str:
  """The registered strategies that take `option` (a dataclass field), e.g. 'displaced'."""
  return ", ".join(n for n in strategy_names() if option in option_names(n))


def strategy_flag(what: str, names: Sequence[str] | None = None) -> Flag:
  """--strategies NAME… (or --strategy): one or more of `names` (default: every registered strategy),
  each described in the help."""
  names = strategy_names() if names is None else tuple(names)
  described = "; ".join(f"{n}: {strategy_class(n).description}" for n in names)
  return Flag(f"{what}. {described}", aliases=("--strategy",), choices=names, metavar="NAME")


def groupnorm_flag(several: bool = False) -> Flag:
  """--groupnorm, its modes named from GroupNormMode (checked, with the fix, by GroupNormMode.parse)."""
  modes = ", ".join(m.value for m in GroupNormMode)
  return Flag(f"{strategies_taking('groupnorm')} GroupNorm mode{'s' if several else ''}: {modes}")


def _escaped(text: str) -> str:
  """`text` as an argparse help string (which %-formats it)."""
  return text.replace("%", "%%")
