"""rare_celery: Celery retries that wait in RabbitMQ, not in worker memory.

>>> from rare_celery import RareTask, Bug, backoff
"""

from . import backoff
from .exceptions import Bug, ConfigurationError, Exhausted, Expired, PublishRefused, TopologyError
from .task import RareTask

__all__ = [
           "Bug",
           "ConfigurationError",
           "Exhausted",
           "Expired",
           "PublishRefused",
           "RareTask",
           "TopologyError",
           "backoff",
]
__version__ = "0.1.0"
