"""Clusters made on one machine for tests and benchmarks: network-namespace nodes over shaped TCP links."""
