"""One error family: every edgeswarm exception is an `EdgeswarmError` carrying a `ReasonCode`.

Reason codes are on the wire (`DeviceState.reason_code`) so they live here, beside the models;
people read the exception's message, machines (the fleet service, Home Assistant, tests) match the
code. Subclasses per area (trust, content, delta, install, messaging, operator) set their class
default; `UpdateFailed` and a few others carry a code per instance.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["EdgeswarmError", "ReasonCode"]


class ReasonCode(StrEnum):
    # Trust: a signed document refused (services.runtime.trust).
    UNTRUSTED = "untrusted"
    MALFORMED = "malformed"
    WRONG_TYPE = "wrong_type"
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_KEY = "unknown_key"
    THRESHOLD_NOT_MET = "threshold_not_met"
    WRONG_FLEET = "wrong_fleet"
    WRONG_CLASS = "wrong_class"
    WRONG_TARGET = "wrong_target"
    ROLLBACK = "rollback"
    ROOT_CHAIN_GAP = "root_chain_gap"
    ROOT_OUTDATED = "root_outdated"
    EXPIRED = "expired"
    FROZEN = "frozen"
    TIMESTAMP_MISMATCH = "timestamp_mismatch"
    MALFORMED_COMMAND = "malformed_command"
    # Content: fetching bytes (services.runtime.content).
    FETCH_FAILED = "fetch_failed"
    ENDLESS_DATA = "endless_data"
    SLOW_RETRIEVAL = "slow_retrieval"
    FETCH_DEADLINE = "fetch_deadline"
    # Verifying and opening what was fetched.
    HASH_MISMATCH = "hash_mismatch"
    DECRYPT_FAILED = "decrypt_failed"
    NO_CLASS_KEY = "no_class_key"
    BAD_PATCH = "bad_patch"
    # Installing and confirming (device_client).
    HANDLER_NOT_ALLOWED = "handler_not_allowed"
    INSTALL_FAILED = "install_failed"
    UNSAFE_PATH = "unsafe_path"
    HEALTH_CHECK_FAILED = "health_check_failed"
    UNCONFIRMED_RESTART = "unconfirmed_restart"
    ROLLED_BACK = "rolled_back"
    AWAITING_ROLLOUT = "awaiting_rollout"
    IO_ERROR = "io_error"
    DISK_FULL = "disk_full"  # no room for the update on the device's file systems; retried, the old version stays
    INTERNAL_ERROR = "internal_error"
    STATE_RESET = "state_reset"
    # The device's network and broker.
    BROKER_ERROR = "broker_error"
    NAT_PMP_FAILED = "nat_pmp_failed"
    # The operator side.
    KEY_LOCKED = "key_locked"
    RELEASE_REFUSED = "release_refused"
    ROOT_CHANGE_REFUSED = "root_change_refused"
    REQUEST_REFUSED = "request_refused"
    NO_ANSWER = "no_answer"
    NO_IDENTITY = "no_identity"  # a carried report of a device whose identity key is not registered
    REPORT_REPLAYED = "report_replayed"  # a carried report whose counter is not above the device's last one


class EdgeswarmError(Exception):
    """The root of every edgeswarm exception: a message for people, `code` for machines."""

    code: ReasonCode = ReasonCode.INTERNAL_ERROR

    def __init__(self, *args: object, code: ReasonCode | None = None) -> None:
        super().__init__(*args)
        if code is not None:
            self.code = code
