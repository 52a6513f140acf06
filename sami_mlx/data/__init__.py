"""The data shipped with the package: built-in queries, templates, constitutions, recipes, model presets."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def data_dir(package: str, fallback: str) -> Path:
    """Where the package `package` (e.g. sami_mlx.data.recipes) keeps its files: `fallback`, a folder
    relative to sami_mlx/, when this is a source checkout, else the installed package's folder."""
    # A source checkout's own folder first: an editable install maps the package to the checkout
    # it was installed from, which is not this one when several checkouts share an environment.
    here = Path(__file__).resolve().parent.parent / fallback
    if here.is_dir():
        return here.resolve()
    return Path(str(resources.files(package)))
