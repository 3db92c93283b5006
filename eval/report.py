"""Compare runs and the OOD benchmark matrix (`--help`); the command is glow.cli.report, installed as `glow-report`."""

from glow.cli.report import main

if __name__ == "__main__":
    main()
