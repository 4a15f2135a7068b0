"""Active and standby fleet services: the one holding the fleet record's lock is active.

A standby neither connects to the broker (the active one owns the service's persistent session
and client id) nor writes to the record; it asks for the lock every `poll` seconds and, once it
has it, starts as the active service from what the record and the retained topics hold.
"""

from __future__ import annotations

import asyncio
import logging

from services.operator.fleet_store import FleetStore

log = logging.getLogger(__name__)


async def wait_until_active(store: FleetStore, fleet: str, stop: asyncio.Event, *, poll: float = 1.0) -> bool:
    """True once this process is the fleet's active service; False if `stop` is set first."""
    waited = False
    while not stop.is_set():
        if store.try_lead(fleet):
            if waited:
                log.info("taking over: this fleet service is now the active one for %s", fleet)
            return True
        if not waited:
            waited = True
            log.info("standby: another fleet service of %s holds %s; taking over when it stops", fleet, store.where)
        try:
            await asyncio.wait_for(stop.wait(), poll)
        except TimeoutError:
            pass
    return False
