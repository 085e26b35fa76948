"""The `clawback` operator CLI: a thin client of the coordinator's AdminService (entry point: main.main)."""
