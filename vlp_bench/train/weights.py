"""A finished run's trained weights: what `vlp-bench evaluate run` and `vlp-bench predict` start from.

Only what trained is kept (the parameters with requires_grad: the bridge, the text side, modules
trained inside the encoder), in safetensors: no pickle, so a weights file cannot run code. Every
other tensor of the method is rebuilt as the run built it: the frozen backbones from their cache or
checkpoint, the rest from the run's seed. The frozen backbones' fingerprint is written beside the
tensors, so weights are never put on backbones other than the ones they were trained against.

    save_weights(path, method, meta)   one atomic .safetensors file; `meta`: JSON-able facts kept in
                                       its header (the method's name, the run's step)
    load_weights(path, method) -> meta the tensors put back, bit for bit, after checking that they
                                       are exactly this method's trainable parameters and backbones
    backbone_fingerprint(method)       a short hash of the frozen vision encoder and LLM
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from vlp_bench.errors import UserError
from vlp_bench.files import atomic_file
from vlp_bench.method import Method

FORMAT = "vlp-bench-weights/1"
_EDGE = 256  # elements read from each end of every frozen tensor for the fingerprint


def trained_tensors(method: Method) -> dict[str, torch.Tensor]:
    """The method's trainable parameters by name, as CPU tensors."""
    return {n: p.detach().cpu().contiguous() for n, p in method.named_parameters() if p.requires_grad}


def backbone_fingerprint(method: Method) -> str:
    """sha256 over every frozen tensor of the vision encoder and the LLM (what trains inside them,
    like simvlg-video's temporal modules, is left out): name, shape, first and last elements rounded to
    bf16: cheap at any scale, the same for the fp32 backbones of a CPU and the bf16 ones of a GPU
    (vlp_bench.backbones.frozen_dtype), different for another checkpoint or a re-pre-trained tiny one."""
    cached = getattr(method.llm, "vlp_bench_fingerprint", None)  # taken before it was sharded
    return cached or fingerprint_of(method.vision, method.llm)


def fingerprint_of(vision: nn.Module, llm: nn.Module) -> str:
    """backbone_fingerprint of these backbones, read from their (whole) weights."""
    h = hashlib.sha256()
    for part, module in (("vision", vision), ("llm", llm)):
        frozen = [*((n, p) for n, p in module.named_parameters() if not p.requires_grad), *module.named_buffers()]
        for name, t in sorted(frozen, key=lambda item: item[0]):
            flat = t.detach().reshape(-1)
            edges = torch.cat([flat[:_EDGE], flat[-_EDGE:]]).cpu()
            if edges.is_floating_point():
                edges = edges.to(torch.bfloat16)
            h.update(f"{part}.{name}:{tuple(t.shape)}".encode())
            h.update(edges.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_weights(path: Path, method: Method, meta: dict) -> dict:
    """Write the trainable parameters to `path` (atomically); returns what results.json records of them."""
    from safetensors.torch import save

    tensors = trained_tensors(method)
    header = {"format": FORMAT, "backbones": backbone_fingerprint(method), **{k: json.dumps(v) for k, v in meta.items()}}
    with atomic_file(Path(path)) as tmp:
        tmp.write_bytes(save(tensors, metadata=header))  # written as every record is (the umask's permissions)
    return {"file": Path(path).name, "tensors": len(tensors), "parameters": sum(t.numel() for t in tensors.values()),
            "bytes": Path(path).stat().st_size, "backbones": header["backbones"]}


def read_meta(path: Path) -> dict:
    """The header of a weights file: format, backbones and the saved facts (JSON-decoded)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same one-line refusal
        raise UserError(f"{path}: not a readable weights file ({type(e).__name__}: {e})") from None
    if header.get("format") != FORMAT:
        raise UserError(f"{path}: not a vlp-bench weights file (format {header.get('format')!r}, expected {FORMAT!r})")
    return {k: (v if k in ("format", "backbones") else json.loads(v)) for k, v in header.items()}


def load_weights(path: Path, method: Method) -> dict:
    """Put the weights of `path` into `method`, after checking they are its trainable parameters
    (same names, same shapes) and were trained on the backbones it holds; returns the header."""
    from safetensors.torch import load_file

    meta = read_meta(path)
    here = backbone_fingerprint(method)
    if meta["backbones"] != here:
        raise UserError(f"{path} was trained on other frozen backbones (fingerprint {meta['backbones']}, these are "
                        f"{here}): the run's backbones are not available here (another cache, or re-pre-trained)")
    saved = load_file(str(path))
    params = {n: p for n, p in method.named_parameters() if p.requires_grad}
    missing, unknown = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
    wrong = [n for n in sorted(set(params) & set(saved)) if saved[n].shape != params[n].shape]
    for what, names in (("lacks", missing), ("holds a parameter the method does not have:", unknown),
                        ("holds another shape for", wrong)):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise UserError(f"{path} does not match method '{method.name}': it {what} {names[0]}{more}; was it "
                            f"written by another version or config of the method?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))
    return meta
