"""rare_celery: Celery retries that wait in RabbitMQ, not in worker memory.

>>> from rare_celery import RareTask, Bug, backoff
"""

from . import backoff, signals
from .batch import bulk
from .endings import HOPPED
from .exceptions import (
    Bug,
    ConfigurationError,
    Exhausted,
    Expired,
    Hop,
    HopLimit,
    NoHandler,
    PublishRefused,
    RetryAfter,
    TopologyError,
)
from .task import RareTask

__all__ = [
    "HOPPED", "Bug", "ConfigurationError", "Exhausted", "Expired", "Hop", "HopLimit", "NoHandler",
    "PublishRefused", "RareTask", "RetryAfter", "TopologyError", "backoff", "bulk", "signals",
]
__version__ = "0.1.0"
