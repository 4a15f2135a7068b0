"""Export the JSON Schema of every wire model into schemas/json/ (`python -m schemas.export`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel

from schemas.models import DeviceCommand, DeviceState, PeerAnnouncement, ReleaseManifest, RootMetadata, SignedEnvelope, TimestampMetadata
from schemas.ops import ControlRollout, DeviceRequest, OpsResult, RolloutStatus, StartRollout

MODELS: dict[str, type[BaseModel]] = {
    "root": RootMetadata,
    "release-manifest": ReleaseManifest,
    "timestamp": TimestampMetadata,
    "signed-envelope": SignedEnvelope,
    "device-state": DeviceState,
    "device-command": DeviceCommand,
    "peer-announcement": PeerAnnouncement,
    "ops-rollout-start": StartRollout,
    "ops-rollout-control": ControlRollout,
    "ops-device-request": DeviceRequest,
    "ops-result": OpsResult,
    "ops-rollout-status": RolloutStatus,
}
OUT_DIR = Path(__file__).parent / "json"


def rendered() -> dict[str, str]:
    return {
        f"{name}.schema.json": json.dumps(model.model_json_schema(mode="validation"), indent=2, sort_keys=True) + "\n"
        for name, model in MODELS.items()
    }


def main() -> int:
    OUT_DIR.mkdir(exist_ok=True)
    for filename, text in rendered().items():
        (OUT_DIR / filename).write_text(text)
        print(f"wrote {OUT_DIR / filename}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
