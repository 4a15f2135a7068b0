"""The wire contract of edgeswarm: every message as a typed model, topic names and canonical JSON.

Nothing here performs I/O; services/ and device_client/ build on these types.
"""
