"""``rare-celery web``: a console for whoever is on call, and Prometheus metrics (``pip install "rare-celery[web]"``).

* :mod:`.reading`: how a bug queue is read without consuming it, into a compact snapshot;
* :mod:`.console`: the console's broker work (overview, snapshots, plan then take) in background jobs;
* :mod:`.metrics`: ``/metrics`` (prometheus_client), queue gauges and counters of ``rare-*`` events;
* :mod:`.security`: bind, auth, host, CSRF and the pages' content security policy;
* :mod:`.app`: the Flask pages; :mod:`.server`: waitress, started by the CLI.
"""
