"""The demo and its scaffolding: sample images, device provisioning on one machine, local ports,
agent processes. Used by `edgeswarm demo`, the tests and the benchmarks; never by a device."""
