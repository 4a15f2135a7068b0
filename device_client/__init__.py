"""The device agent: hears signed releases over MQTT, fetches over IPFS, verifies, patches, installs."""
