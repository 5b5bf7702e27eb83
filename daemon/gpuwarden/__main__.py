"""`python -m gpuwarden ...`: the same as the `gpuwarden` command."""

from gpuwarden.cli import main

if __name__ == "__main__":
    main()
