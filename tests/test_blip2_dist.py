"""BLIP-2's stage 1 across ranks, as LAVIS under DDP: two gloo processes on the CPU with the same
weights, each holding half of a batch, against one process holding all of it (float64, eval mode).

- ITC: each rank's loss compares its pairs with the whole gathered batch, so the mean over ranks is
  the one-process loss;
- ITM (its negatives' indices fixed): the same, and the gradient too: the negative images'
  embeddings are gathered with gradient, so the rank that holds an image gets the gradient of every
  rank's use of it, and the gradient DDP averages (the trainer's `dist.Replicas`) is the one-process
  gradient on every rank;
- `all_gather_with_grad`: each rank's input gets the gradient of the sum of the ranks' losses.
"""

from __future__ import annotations

import copy
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from test_blip2 import CAPTIONS, small
from vlp_bench.methods.blip2 import hard_negatives
from vlp_bench.nn.qformer import attention_mask
from vlp_bench.train import dist

WORLD, LOCAL = 2, 2  # 2 ranks x 2 pairs


def _losses(m, visual, ids, valid, negatives):
    """(ITC, ITM) of these pairs, as stage1_loss computes them, the ITM negatives given."""
    qf = m.qformer
    image = qf.ln_vision(visual)
    queries, _ = qf(context=image)
    img = F.normalize(m.vision_proj(queries), dim=-1)
    txt = F.normalize(m.text_proj(qf(ids=ids, mask=attention_mask(0, valid, "text"))[0][:, 0]), dim=-1)
    itc, sim_i2t, sim_t2i = m.itc(img, txt)
    return itc, m.itm(image, ids, valid, sim_i2t, sim_t2i, negatives)


def _grads(m) -> dict:
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


class _ITM(torch.nn.Module):
    """Stage 1's ITM as a method's training_loss, for the trainer's DDP (dist.Replicas)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def training_loss(self, batch: tuple, stage):
        itc, itm = _losses(self.m, *batch)
        return SimpleNamespace(loss=itm, itc=itc)


def _worker(rank: int, port: int, tmp: str):
    os.environ.update(WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init(torch.device("cpu"))
    try:
        data = torch.load(os.path.join(tmp, "in.pt"), weights_only=False)
        m = data["model"]  # pickled whole: the same weights, no backbones to rebuild
        part = slice(rank * LOCAL, (rank + 1) * LOCAL)
        batch = (data["visual"][part], data["ids"][part], data["valid"][part],
                 (data["neg_text"][part], data["neg_image"][part]))
        replicas = dist.Replicas(_ITM(m), [p for p in m.parameters() if p.requires_grad])
        out = replicas.loss(batch, "stage1")
        out.loss.backward()  # DDP averages the ranks' gradients
        itc, itm = out.itc, out.loss
        x = data["x"][part].clone().requires_grad_()
        (data["w"][rank] * dist.all_gather_with_grad(x)).sum().backward()
        torch.save({"itc": itc.item(), "itm": itm.item(), "grads": _grads(m), "x_grad": x.grad},
                   os.path.join(tmp, f"out{rank}.pt"))
    finally:
        dist.finish()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bridge_only(m):
    """The method without its frozen backbones and tokenizer (what ITC and ITM never touch), so a
    worker unpickles it in a moment (the tiny LLM's classes are slow to import)."""
    light = copy.copy(m)
    light._modules = {k: v for k, v in m._modules.items() if k not in ("vision", "llm")}
    light.tokenizer = light.text = None
    return light


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The one-process figures, and each rank's, of the same weights and batch."""
    tmp = tmp_path_factory.mktemp("blip2-dist")
    m = small().double().eval()
    g = torch.Generator().manual_seed(2)
    images = torch.randn(WORLD * LOCAL, 3, 64, 64, generator=g, dtype=torch.float64)
    captions = [*CAPTIONS, "two blue stars"]
    ids, valid = m.text(captions, m.cfg.max_text_len)
    visual = m.encode(images).double()
    with torch.no_grad():  # negatives drawn once over the whole batch, then fixed for both runs
        qf = m.qformer
        img = F.normalize(m.vision_proj(qf(context=qf.ln_vision(visual))[0]), dim=-1)
        txt = F.normalize(m.text_proj(qf(ids=ids, mask=attention_mask(0, valid, "text"))[0][:, 0]), dim=-1)
        _, sim_i2t, sim_t2i = m.itc(img, txt)
    torch.manual_seed(0)
    neg_text, neg_image = hard_negatives(sim_i2t, sim_t2i)
    data = {"model": _bridge_only(m), "visual": visual, "ids": ids, "valid": valid, "neg_text": neg_text,
            "neg_image": neg_image, "x": torch.randn(WORLD * LOCAL, 3, generator=g, dtype=torch.float64),
            "w": torch.randn(WORLD, WORLD * LOCAL, 3, generator=g, dtype=torch.float64)}
    torch.save(data, tmp / "in.pt")
    itc, itm = _losses(m, visual, ids, valid, (neg_text, neg_image))
    itm.backward()
    one = {"itc": itc.item(), "itm": itm.item(), "grads": _grads(m)}
    mp.spawn(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f"out{r}.pt", weights_only=False) for r in range(WORLD)]
    return one, ranks, data


def test_itc_averaged_over_ranks_is_the_one_process_loss(runs):
    one, ranks, _ = runs
    assert sum(r["itc"] for r in ranks) / WORLD == pytest.approx(one["itc"], rel=1e-6)
    assert ranks[0]["itc"] != pytest.approx(ranks[1]["itc"], rel=1e-6)  # each rank's own pairs


def test_itm_with_fixed_negatives_averaged_over_ranks_is_the_one_process_loss_and_gradient(runs):
    one, ranks, _ = runs
    assert sum(r["itm"] for r in ranks) / WORLD == pytest.approx(one["itm"], rel=1e-6)
    assert ranks[0]["grads"].keys() == ranks[1]["grads"].keys() == one["grads"].keys()
    for name, grad in one["grads"].items():  # DDP's average, the same on every rank
        for r in ranks:
            assert torch.allclose(r["grads"][name], grad, rtol=1e-6, atol=1e-12), name
    assert "qformer.ln_vision.weight" in one["grads"]  # reached through the gathered negative images


def test_gather_with_grad_gives_each_rank_the_gradient_of_the_summed_loss(runs):
    _, ranks, data = runs
    # rank r's loss is sum(w[r] * gathered x): the summed loss's gradient w.r.t. x is sum_r w[r]
    expected = data["w"].sum(dim=0)
    for rank, r in enumerate(ranks):
        assert torch.allclose(r["x_grad"], expected[rank * LOCAL: (rank + 1) * LOCAL], rtol=0, atol=1e-12)
