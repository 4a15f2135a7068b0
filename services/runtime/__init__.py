"""The runtime a device needs, shared with the operator side.

trust (the pure trust rules), keys (Ed25519 signing and verification), confidential (per-class
payload encryption), messaging (the MQTT client behind one adapter), content (the IPFS content
store), delta (ESDELTA1 deltas), natpmp and traffic (the device's view of its network), settings
(typed settings from TOML and EDGESWARM_* variables) and files (atomic writes).

Nothing here imports the operator side, the CLI, the demo or the device agent (checked by
tests/unit/test_architecture.py). Each module's `__all__` is its public surface; `content` and
`delta` are packages whose `__init__` exports what others may use.
"""
