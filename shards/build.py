"""Build and verify shards (`--help`); the command is glow.cli.shards, installed as `glow-shards`."""

from glow.cli.shards import cli

if __name__ == "__main__":
    cli()
