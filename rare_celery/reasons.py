"""Why a message ended in a bug queue (``x-rare-reason``): every reason, named once.

=================  ===========================================================================
reason             meaning
=================  ===========================================================================
``exhausted``      its last attempt failed (``max_attempts``)
``expired``        its shelf life ended (``expires_in``, Celery's ``expires``)
``bug``            ``Bug``, an exception outside ``retry_on``, or arguments ``run`` refuses
``no_handler``     ``dispatch_on`` found no payload handler
``hop_limit``      a hop would loop or pass ``max_hops``
``worker_lost``    its last attempt never finished: the process running it died
``time_limit``     its last attempt never finished: the hard time limit ended it
``unregistered``   no worker knows its task name
``rejected``       a message rare_celery cannot read (headers, body)
``unroutable``     delivered too often without reaching a next place
=================  ===========================================================================
"""

from __future__ import annotations

EXHAUSTED, EXPIRED, BUG, NO_HANDLER, HOP_LIMIT = "exhausted", "expired", "bug", "no_handler", "hop_limit"
WORKER_LOST, TIME_LIMIT, UNREGISTERED, REJECTED, UNROUTABLE = (
    "worker_lost", "time_limit", "unregistered", "rejected", "unroutable")
ALL = (EXHAUSTED, EXPIRED, BUG, NO_HANDLER, HOP_LIMIT, WORKER_LOST, TIME_LIMIT, UNREGISTERED, REJECTED, UNROUTABLE)
