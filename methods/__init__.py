"""vlp-bench's own methods, one file each: importing this package registers them (pyproject.toml
declares it as the entry point of the built-in methods; vlp_bench.registry loads it like any
plug-in). This is their one registration list."""

from vlp_bench.methods import (  # noqa: F401 - imported for their @METHODS.register
    ar, baseline, blip2, flip, flm, mlm, projectors, simvlg, simvlg_video, tome_vit)
from vlp_bench.registry import METHODS

# "bridge+side" compositions registered (listed, configurable, tested) like the methods above, with
# the settings they need beyond their parts'; any other bridge method + vision side can be named in
# experiment.methods and is composed on demand.
METHODS.register_composition("simvlg+tome-vit", r=4)  # the ViT hands on 33 tokens; 4 + 4 merged in the bridge reach simvlg's 25
METHODS.register_composition("simvlg+flip")
