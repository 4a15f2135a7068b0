"""Which device reports the fleet service believes, without I/O (like services.runtime.trust).

A device's report reaches the fleet service either directly, on its own state topic, where the
broker's login and ACL bind it to the device, or carried by a peer (relayed), published under the
peer's login on the peer's `relay` topic. A carried report is believed only for what the device
itself signed: the signature of the identity key registered for the device named in the report
(services.operator.identities), over the report's canonical bytes, with a counter above the
highest one already believed for that device. So a relay can delay or drop reports, never make
one up, alter one, or replay an old one.
"""

from __future__ import annotations

from collections.abc import Callable

import pydantic

from schemas.canonical import MalformedDocument
from schemas.errors import EdgeswarmError, ReasonCode
from schemas.models import MAX_REPORT_BYTES, DeviceState, PayloadType, PublicKey
from services.runtime.keys import key_id, verify_signature

__all__ = ["ReportRefused", "judge_carried", "signed_by"]


class ReportRefused(EdgeswarmError):
    """A carried report the fleet service does not believe; `code` says why."""

    code = ReasonCode.UNTRUSTED


def signed_by(state: DeviceState, key: PublicKey) -> bool:
    """Whether `state` carries a valid signature of `key` (its key id and its bytes)."""
    signature = state.signature
    if signature is None or signature.keyid != key_id(bytes.fromhex(key.public)):
        return False
    return verify_signature(key, signature, PayloadType.REPORT.value, state.signed_bytes())


def judge_carried(raw: bytes, *, fleet: str, key_of: Callable[[str], PublicKey | None],
                  highest: Callable[[str], int | None]) -> DeviceState:
    """The report in `raw`, which a peer carried, if the device it names signed it and it is new.

    `key_of(device)` is the registered identity key; `highest(device)` the highest counter believed
    for the device so far (None before the first).

    Raises:
        ReportRefused: malformed, another fleet's, no key registered for its device, unsigned, a
            signature that does not verify, or a counter not above the highest one (a replay).
    """
    try:
        state = DeviceState.from_bytes(raw, max_bytes=MAX_REPORT_BYTES)
    except (MalformedDocument, pydantic.ValidationError) as exc:
        raise ReportRefused(f"malformed report: {str(exc)[:200]}", code=ReasonCode.MALFORMED) from None
    if state.fleet != fleet:
        raise ReportRefused(f"a report of fleet {state.fleet!r}, not {fleet!r}", code=ReasonCode.WRONG_FLEET)
    key = key_of(state.device)
    if key is None:
        raise ReportRefused(f"no identity key is registered for {state.device}: only its direct reports count",
                            code=ReasonCode.NO_IDENTITY)
    if state.signature is None or state.counter is None:
        raise ReportRefused(f"{state.device}'s report is not signed", code=ReasonCode.UNTRUSTED)
    if not signed_by(state, key):
        raise ReportRefused(f"{state.device}'s report does not carry a valid signature of its identity key",
                            code=ReasonCode.BAD_SIGNATURE)
    last = highest(state.device)
    if last is not None and state.counter <= last:
        raise ReportRefused(f"{state.device}'s report #{state.counter} is not newer than #{last} (a copy or a replay)",
                            code=ReasonCode.REPORT_REPLAYED)
    return state
