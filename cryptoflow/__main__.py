"""`python -m cryptoflow` and the `cryptoflow` script.

The CLI's libraries (typer, click, rich) take ~0.1 s to import; Ctrl-C then used to print
a KeyboardInterrupt traceback from the import. It exits 130 quietly, as it does later
(`cli.main`).
"""

import sys


def main() -> None:
    try:
        from cryptoflow.cli import main as cli_main
    except KeyboardInterrupt:
        sys.exit(130)
    cli_main()


if __name__ == "__main__":
    main()
