"""Experiment trackers: the rows of metrics.jsonl mirrored to TensorBoard and Weights & Biases.

The run records stay the source of truth (reports and targets read only them); a tracker shows the
same numbers where a lab already looks. Both are optional extras (`pip install 'vlp-bench[tensorboard]'`
or `[wandb]`), switched on in bench.toml's [trackers], opened by rank zero only. A tracker that fails
during a run is switched off with a warning: it never fails the run.

Every row becomes scalars at its training step: "train/loss", "train/lr", "train/tokens_to_llm",
"train/flops", "train/wall_s" for training rows; "val/caption/CIDEr", "val/vqa/overall", ... for
validation rows, and "val/loss" where a row has the validation loss; "test/..." for the final row
(the floors, constant, are left out).
"""

from __future__ import annotations

import hashlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from vlp_bench.errors import UserError
from vlp_bench.log import warn


@dataclass
class TrackersConfig:
    tensorboard: bool = False  # event files in each run directory: `tensorboard --logdir OUT` shows every run
    wandb: Literal["off", "offline", "online"] = "off"  # offline needs no network or account (`wandb sync` later)
    wandb_project: str = "vlp-bench"  # the W&B project the runs go to
    wandb_entity: str = ""  # "" = the account's default entity

    def check(self) -> None:
        """Before any training: the packages of the trackers switched on are installed."""
        for on, module, extra in ((self.tensorboard, "torch.utils.tensorboard", "tensorboard"),
                                  (self.wandb != "off", "wandb", "wandb")):
            if on:
                try:
                    importlib.import_module(module)
                except ImportError:
                    raise UserError(f"trackers.{extra} is on but the {extra} package is missing: "
                                    f"pip install 'vlp-bench[{extra}]'") from None


def scalars(row: dict) -> dict[str, float]:
    """A metrics.jsonl row -> {tag: value}; its validation loss, where read, as "val/loss"."""
    loss = {"val/loss": float(row["val_loss"])} if isinstance(row.get("val_loss"), (int, float)) else {}
    if "eval" in row:
        prefix = row.get("split", "val")
        return {**{f"{prefix}/{tag}": v for tag, v in _leaves(row["eval"])}, **loss}
    keys = ("loss", "lr", "tokens_to_llm", "flops", "wall_s")
    return {**{f"train/{k}": float(row[k]) for k in keys if isinstance(row.get(k), (int, float))}, **loss}


def _leaves(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if key == "floor":
            continue
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f"{prefix}{key}", float(value)


class TensorBoard:
    """Event files in the run directory. The writer opens at the first row this process logs and
    purges later steps an earlier, interrupted process left, so a resumed run has one curve."""

    def __init__(self, cfg: TrackersConfig, run_dir: Path, record: dict):
        self.dir, self.writer = Path(run_dir), None

    def log(self, row: dict) -> None:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dir), purge_step=row["step"])
        for tag, value in scalars(row).items():
            self.writer.add_scalar(tag, value, row["step"])
        self.writer.flush()

    def close(self, record: dict) -> None:
        if self.writer is not None:
            self.writer.close()


class WandB:
    """One W&B run per vlp-bench run: config = the resolved config, summary = the final figures.
    Its id comes from the run directory, so a resumed run continues the same W&B run."""

    def __init__(self, cfg: TrackersConfig, run_dir: Path, record: dict):
        import wandb

        run_id = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity or None, id=run_id,
                              resume="allow", name=record["run_id"], dir=str(run_dir), mode=cfg.wandb,
                              config=record["config"], group=Path(run_dir).parent.name,
                              settings=wandb.Settings(console="off", silent=True))

    def log(self, row: dict) -> None:
        self.run.log(scalars(row), step=row["step"])

    def close(self, record: dict) -> None:
        cost = {f"cost/{k}": v for k, v in record.get("cost", {}).items() if isinstance(v, (int, float))}
        self.run.summary.update({"status": record["status"], **cost})
        self.run.finish(exit_code=0 if record["status"] == "finished" else 1)


class Trackers:
    """The trackers a run's config switches on; `log(row)` for every metrics row, `close(record)` last."""

    def __init__(self, cfg: TrackersConfig, run_dir: Path, record: dict):
        kinds = [TensorBoard] * cfg.tensorboard + [WandB] * (cfg.wandb != "off")
        self.active = []
        for kind in kinds:
            self._guard(kind.__name__, lambda: self.active.append(kind(cfg, run_dir, record)))

    def log(self, row: dict) -> None:
        for tracker in list(self.active):
            self._guard(type(tracker).__name__, lambda: tracker.log(row), tracker)

    def close(self, record: dict) -> None:
        for tracker in list(self.active):
            self._guard(type(tracker).__name__, lambda: tracker.close(record), tracker)
        self.active = []

    def _guard(self, name: str, call, tracker=None) -> None:
        try:
            call()
        except Exception as e:  # noqa: BLE001 - a tracker never fails a run: its records are complete
            warn(f"tracker {name} switched off ({type(e).__name__}: {e}); the run's records are unaffected")
            if tracker in self.active:
                self.active.remove(tracker)
