"""The ``rare-celery`` command line (inspect, requeue and purge bug queues: coming next)."""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rare-celery")
def main() -> None:
    """Operate rare_celery queues: bug queues, delay queues and the topology."""


if __name__ == "__main__":
    main()
