"""`python -m dfjax …`: the same command as `dfjax …`."""

import sys

from dfjax.commands import main

if __name__ == "__main__":
  sys.exit(main())
