"""Every parallel method, one module each, registered by name (see base.py).

Importing this package imports every strategy module, so the registry is complete for
`Strategy.from_name`, `strategy_names()` and the CLI. The import order is the registry's order.
"""

from sharding.strategies import single  # isort: skip  (first: the reference of the others)
from sharding.strategies import patch  # isort: skip
from sharding.strategies import ulysses  # isort: skip  (after the row-patch strategies)
from sharding.strategies import ring  # isort: skip
from sharding.strategies import usp  # isort: skip
from sharding.strategies import pipefusion  # isort: skip
from sharding.strategies import tensor  # isort: skip
from sharding.strategies import asyncdiff  # isort: skip  (after the patch family)
from sharding.strategies.base import (Phase, Strategy, option_names, strategy_class, strategy_names,
                                      with_shared_options)
from sharding.strategies.cfg import Guidance

__all__ = ["Guidance", "Phase", "Strategy", "asyncdiff", "option_names", "patch", "pipefusion", "ring", "single",
           "strategy_class", "strategy_names", "tensor", "ulysses", "usp", "with_shared_options"]
