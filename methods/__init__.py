"""Built-in methods, one file each. Every module here is imported by `vlp_bench.registry.METHODS`."""
