"""Helpers shared by the test suite: gateway processes and clusters, a fault-injecting proxy."""
