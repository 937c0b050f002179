"""``python -m mpt_tools`` and the ``mpt-tools`` console script.

The signal handlers are installed first, before Click and the command line are imported (a few
tenths of a second): a signal that comes meanwhile is noted, and the command line acts on it before
it parses the arguments (``error: interrupted by SIGTERM; nothing was written``, exit 143), never a
traceback or a silent death.
"""


def main() -> None:
    """Entry point of the ``mpt-tools`` console script (and ``python -m mpt_tools``)."""
    from mpt_tools.interrupts import install

    install(act=False)  # signals are noted until the command runs: see mpt_tools.cli.main
    from mpt_tools.cli import main as run

    run()


if __name__ == "__main__":
    main()
