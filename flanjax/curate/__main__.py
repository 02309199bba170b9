"""python -m flanjax.curate COMMAND INPUT... --out OUT.jsonl (see flanjax/curate/cli.py)."""

from flanjax import config as flan_config
from flanjax.curate import cli

if __name__ == "__main__":
  flan_config.as_command(cli.main)
