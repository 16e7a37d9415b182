"""``python -m qlight`` is the same as the ``qlight`` console script."""

from qlight.cli import console_main

if __name__ == "__main__":
    console_main()
