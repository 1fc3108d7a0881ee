"""`dfjax bench` subcommands: each measures side by side in one run and names the machine."""
