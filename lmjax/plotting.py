"""matplotlib for the commands that draw (`lmjax fit`, `lmjax coordcheck --plot`): files only."""
from __future__ import annotations

from lmjax.errors import UsageError


def pyplot():
  """matplotlib.pyplot on the Agg backend (files only), or a clear error."""
  try:
    import matplotlib
  except ImportError:
    raise UsageError("lmjax draws plots with matplotlib, which is not installed: "
                     "pip install -e \".[plots]\" (or pass --no_plots for the numbers alone).") \
        from None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def no_minor_labels(ax):
  """A log axis spanning less than a decade labels its minor ticks, overlapping: drop them."""
  from matplotlib.ticker import NullFormatter
  ax.xaxis.set_minor_formatter(NullFormatter())
