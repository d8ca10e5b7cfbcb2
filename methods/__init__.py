"""Built-in methods, one file each. Every module here is imported by `vlp_bench.registry.METHODS`."""

# "bridge+side" compositions registered (listed, configurable, tested) like the methods above, with
# the settings they need beyond their parts'; any other bridge method + vision side can be named in
# experiment.methods and is composed on demand.
COMPOSITIONS = {
    "simvlg+tome-vit": {"r": 4},  # the ViT hands on 33 tokens; 4 + 4 merged in the bridge reach simvlg's 25
    "simvlg+flip": {},
}
