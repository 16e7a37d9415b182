"""``python -m qlight`` is the same as the ``qlight`` console script."""

from qlight.cli import main

if __name__ == "__main__":
    main()
