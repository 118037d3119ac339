"""The example app: the seed's three stories on rare_celery. Run it with ``celery -A example_project
worker``; see ``demo.py`` for the one-command demo and README.md for a walk-through."""

from .app import app

__all__ = ["app"]
