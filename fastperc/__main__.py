"""``python -m fastperc``: the ``fastperc`` command (works under torchrun: ``-m fastperc train``)."""
from fastperc.commands.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
