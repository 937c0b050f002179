"""``python -m mpt_tools``: the same as the ``mpt-tools`` command."""

from mpt_tools.cli import main

if __name__ == "__main__":
    main()
