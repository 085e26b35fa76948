"""The clawback agent: the node daemon that backs up and restores its sources."""
