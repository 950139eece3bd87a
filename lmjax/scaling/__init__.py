"""Scaling laws from a sweep's results: `law` (the fits), `lbfgs` (their optimizer), `report` (the
text `lmjax fit` prints) and `plots`."""
