"""The old home of `lmjax`'s entry point, kept so that installs made before lmjax.commands still
run (their `lmjax` script imports lmjax.cli:main)."""
from lmjax.commands import main  # noqa: F401
