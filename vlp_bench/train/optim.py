"""The optimizer every training loop of vlp-bench builds (the trainer's, `bench --overhead`'s bare
loop): AdamW per stage over the stage's parameters, weight decay on matrices only, a parameter
group per learning-rate multiplier (Method.lr_scale), and the schedule's rate set on each step."""

from __future__ import annotations

import torch

from vlp_bench.method import Method, Stage


def param_groups(params: list, weight_decay: float, scales: list[float] | None = None) -> list[dict]:
    """Weight decay on matrices (and embeddings, queries) only: biases, LayerNorm gains and scalars
    (a temperature, a gate) are not decayed, as the reference trainers do (LAVIS's
    get_optimizer_params: ndim < 2, or a bias or LayerNorm name; BERT and ViLT likewise). `scales`
    (one per parameter, Method.lr_scale) split the groups further, each with its `lr_scale`."""
    scales = scales or [1.0] * len(params)
    groups = []
    for scale in sorted(set(scales)):
        mine = [p for p, s in zip(params, scales) if s == scale]
        for decay, keep in ((weight_decay, lambda p: p.ndim >= 2), (0.0, lambda p: p.ndim < 2)):
            group = {"params": [p for p in mine if keep(p)], "weight_decay": decay}
            groups.append(group if scale == 1.0 else {**group, "lr_scale": scale})
    return groups


def stage_optimizer(method: Method, stage: Stage, cfg) -> tuple[list, torch.optim.AdamW]:
    """The parameters `stage` trains and a fresh AdamW over them (cfg: a TrainConfig)."""
    params = method.trainable_parameters(stage)
    names = {id(p): n for n, p in method.named_parameters()}
    scales = [method.lr_scale(names[id(p)]) for p in params]
    return params, torch.optim.AdamW(param_groups(params, cfg.weight_decay, scales), lr=cfg.lr)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """The schedule's rate for this step, times each group's `lr_scale`."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
