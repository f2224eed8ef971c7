"""Fork detection without a system call per operation.

Connections, locks and id counters must not be shared with a forked child (gunicorn's
pre-fork workers, multiprocessing). Objects remember ``generation`` when they set up their
state and compare it on use; the child's copy of this module counts one fork more.
"""

from __future__ import annotations

import os

generation = 0


def _after_fork_in_child() -> None:
    global generation
    generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)
