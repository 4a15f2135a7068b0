"""Fuzz target (atheris/libFuzzer) for every parser a hostile broker can reach.

    python tests/fuzz/fuzz_trust.py -max_total_time=60 [CORPUS_DIR]

Each input is offered as a release, a timestamp, a root update, a provisioned root, a device
command and a device state. Any exception other than the typed refusals is a bug and stops the
run with a non-zero exit code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    import pydantic

    from schemas.canonical import MalformedDocument
    from schemas.models import DeviceCommand, DeviceState
    from services.runtime.trust import DeviceRecord, TrustedSet, TrustError
    from tests.support.factories import NOW, SHA_V1, TARGET, Keyring, manifest, sign_release, sign_root, sign_timestamp, timestamp

KEYS = Keyring()
ROOT_V1 = sign_root(KEYS.root_metadata(), KEYS.root[:2])
RELEASE = sign_release(manifest(), KEYS.release[:2])
SEEDS = {
    "root-v1": ROOT_V1,
    "root-v2": sign_root(KEYS.root_metadata(version=2), KEYS.root[:2]),
    "release": RELEASE,
    "timestamp": sign_timestamp(timestamp(KEYS, {"ipc": (2, RELEASE)}), KEYS.timestamp),
    "command": b'{"command":"check","request_id":"r1"}',
}
ROOT = TrustedSet.load_initial_root(ROOT_V1)
ON_V1 = DeviceRecord("1.0.0", SHA_V1, 1)


def write_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in SEEDS.items():
        (directory / name).write_bytes(data)


def test_one_input(data: bytes) -> None:
    trusted = TrustedSet(ROOT, device_class="ipc", install_target=TARGET)
    for attempt in (
        lambda: trusted.update_timestamp(data, NOW),
        lambda: trusted.verify_release(data, ON_V1, NOW),
        lambda: trusted.update_root(data),
        lambda: TrustedSet.load_initial_root(data),
    ):
        try:
            attempt()
        except TrustError:
            pass
    for model in (DeviceCommand, DeviceState):
        try:
            model.from_bytes(data, max_bytes=64 * 1024)
        except (MalformedDocument, pydantic.ValidationError):
            pass


def main() -> None:
    corpus = [a for a in sys.argv[1:] if not a.startswith("-")]
    for directory in corpus:
        write_seeds(Path(directory))
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
