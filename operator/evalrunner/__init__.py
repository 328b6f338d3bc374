"""Workshop Eval Runner: run eval suites and never leave a run stuck at `running`."""

__version__ = "0.1.0"
