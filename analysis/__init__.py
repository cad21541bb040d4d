"""Measurements on checkpoints and routing traces (docs/architecture.md, "analysis/").

Importing the package is cheap: `stgc analyze --help` and `stgc report --help` load no pandas or torch.
"""

# Cap on generated answer tokens while capturing routing (the answers of the mini suite are a few tokens).
DEFAULT_MAX_NEW_TOKENS = 16
