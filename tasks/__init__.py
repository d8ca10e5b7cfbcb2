"""vlp-bench's own tasks, one file each: importing this package registers them (pyproject.toml
declares it as the entry point of the built-in tasks; vlp_bench.registry loads it like any plug-in)."""

from vlp_bench.tasks import caption, video_caption, vqa  # noqa: F401 - imported for their @TASKS.register
