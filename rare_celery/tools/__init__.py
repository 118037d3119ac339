"""The operator tools: a separate program on top of the core, with its own entry points
(``rare-celery``, ``celery rare``). Nothing in the core imports them.

* ``cli`` - the commands; ``status`` - queue depths; ``display`` - escaping what came from a message;
* ``bugs`` - reading and taking bug-queue messages; ``moves`` - requeue and purge, counted then taken;
* ``records`` - a bug-queue message as a record; ``timeline`` and ``durations`` - a policy, attempt by
  attempt (``rare-celery schedule``);
* ``web`` - the console and ``/metrics`` (``pip install "rare-celery[web]"``).
"""
