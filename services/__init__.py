"""Runtime parts and the operator side of edgeswarm (content store, messaging, trust, release, CLI)."""
