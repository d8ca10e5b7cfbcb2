"""A run's checkpoint: everything a killed run needs to go on as if it had never stopped.

One file with the trainable weights, the optimizer of the current stage (and that stage's name),
the data position, every rank's RNG state, the metrics rows so far and the trainer's counters
(vlp_bench.train.trainer.TrainState, as a plain dict). Plain dicts, lists, numbers and tensors
only, so it loads with torch.load(weights_only=True): a checkpoint file cannot run code.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlp_bench.data.images import TrainBatches
from vlp_bench.files import atomic_file
from vlp_bench.method import Method
from vlp_bench.results import MetricsLog
from vlp_bench.train.weights import trained_tensors


def rng_state() -> dict:
    """This process's random state (CPU and every CUDA device's)."""
    return {"rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def save_checkpoint(path: Path, method: Method, opt, stage: str, batches: TrainBatches, log: MetricsLog,
                    st: dict, rng: list[dict]) -> None:
    """One file, written to a temporary name and renamed: a kill never leaves half a checkpoint.
    `st`: the trainer's state as a plain dict; `rng`: every rank's random state, in rank order (one
    entry without torchrun)."""
    state = {
        "weights": trained_tensors(method),
        "optimizer": opt.state_dict(), "stage": stage, "batches": batches.state_dict(), "train": st,
        "rows": log.rows, "rng": rng,
    }
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, method: Method, batches: TrainBatches, log: MetricsLog,
                    device, rank: int = 0) -> tuple[dict, dict, str]:
    """Put the weights, data position, this rank's RNG and the metrics rows back; returns the
    trainer's state (a plain dict), the optimizer's state and the name of the stage it belongs to."""
    state = torch.load(path, map_location="cpu", weights_only=True)  # no pickle of arbitrary objects
    params = dict(method.named_parameters())
    unknown = [name for name in state["weights"] if name not in params]
    if unknown:  # e.g. written before the method's architecture changed (the BERT bridges)
        raise ValueError(f"{path} holds weights this method does not have ({unknown[0]}, ...): it was "
                         f"written by another version of the method; start the run afresh")
    with torch.no_grad():
        for name, value in state["weights"].items():
            params[name].copy_(value.to(device))
    batches.load_state_dict(state["batches"])
    rng = state["rng"]
    if isinstance(rng, torch.Tensor):  # a checkpoint of vlp-bench 0.1 (one process's state)
        rng = [{"rng": rng, "cuda_rng": state.get("cuda_rng", [])}]
    rng = rng[rank] if rank < len(rng) else rng[0]  # resumed with more ranks: rank zero's stream
    torch.set_rng_state(rng["rng"])
    if rng["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda_rng"])
    log.rows = list(state["rows"])
    return state["train"], state["optimizer"], state["stage"]
