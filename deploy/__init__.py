"""Deployment assets and the local development cluster used by the demo, the benchmarks and the tests."""
