"""Built-in methods, one file each. Every module here is imported by `vlp_bench.registry.METHODS`."""

# "bridge+side" compositions registered (listed, configurable, tested) like the methods above; any
# other bridge method + vision side can be named in experiment.methods and is composed on demand
COMPOSITIONS = ("simvlg+tome-vit", "simvlg+flip")
