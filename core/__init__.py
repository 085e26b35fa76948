"""What the agent and the coordinator both use: ids, formats, errors, config, TLS, keys."""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
