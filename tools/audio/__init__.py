"""Audio tools for tests and benchmarks: speech samples, quality scoring, a test sound server."""
