"""edgeswarm's runtime parts and its operator side, in four subpackages with one-way dependencies:

    services.cli       the `edgeswarm` command: parse, call, render (may import everything below)
    services.demo      `edgeswarm demo` and its scaffolding (provisioning, sample images, processes)
    services.operator  the management side: release pipeline, fleet service, rollouts, brokers, PKI
    services.runtime   what a device runs too: trust rules, keys, MQTT, IPFS content, deltas, net

device_client (the device agent) builds on services.runtime only; schemas (the wire contract)
imports nothing of ours. tests/unit/test_architecture.py checks these rules.
"""
