"""Built-in tasks, one file each. Every module here is imported by `vlp_bench.registry.TASKS`."""
