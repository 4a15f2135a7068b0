"""The operator side: everything that runs on the management side, never on a device.

home (keys and the root chain on disk), release (the release pipeline and the publish order),
origin (the seeding loop of the origin node), fleet (the retained reports), fleet_store (the fleet
record), record_database (SQLite or PostgreSQL under it, and the active service's lock), standby
(active and standby fleet services), fleet_service (rollouts, operator requests, Home Assistant), rollout (the pure
rollout rules), homeassistant (MQTT discovery), ops_client (operator requests over MQTT),
broker (the embedded amqtt broker), mosquitto and pki (the production broker's config and TLS).

It builds on services.runtime and schemas; it never imports the device agent, the CLI or the demo.
"""
