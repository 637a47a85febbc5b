"""The ``fastperc`` command line: one module per command, apart from the library.

Commands import the library (models, losses, ops, metrics, degradation, checkpoints); the
library never imports a command. :mod:`fastperc.commands.cli` holds the parser and ``main``.
"""
