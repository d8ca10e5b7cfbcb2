"""vlp-bench: which vision-language pre-training acceleration method really saves time?"""

__version__ = "0.1.0"
