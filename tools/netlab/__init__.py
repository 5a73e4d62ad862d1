"""The NAT lab: real NATs in Linux network namespaces, for tests and benchmarks (docs/netlab.md)."""
