"""Count the floating-point operations a piece of code executes, attention included.

    result = flops.count(fn, *args, **kwargs)   # runs fn(*args, **kwargs) once
    result.total, result.forward, result.backward, result.by_part["llm"]["backward"]

Unit: FLOP, 2 per multiply-add (so a (m, k) @ (k, n) product is 2*m*k*n). fvcore counts
multiply-adds ("flops" that are MACs: half of these), only the forward, and nothing inside
`scaled_dot_product_attention`; this counter counts the backward too when `fn` runs one.

What is counted: the matrix products that dominate a transformer's cost, as they execute at the
aten level (mm, addmm, bmm, baddbmm, convolutions and every scaled-dot-product attention kernel,
forward and backward), using PyTorch's own formulas (torch.utils.flop_counter) plus the CPU fused
attention kernels PyTorch's counter leaves at 0. Elementwise work (norms, softmax, activations) is
not counted, as in every MFU convention; causal attention counts the full score matrix, as fused
kernels are credited by PyTorch's counter and PaLM's MFU formula. Shapes are the real ones of this
call, so token merging, curricula and padding are counted as they ran. Works on the meta device
(shapes without memory), which is how `vlp-bench flops` costs paper-scale models; there attention
is costed as the fused kernel a real device runs (backward: 5 products, the scores recomputed), not
as the unfused fallback the meta device would otherwise decompose it into (4).

Breakdown: by part, where a part is a module or a list of modules called one after another
(`parts={"vision": m.vision, "llm": m.llm}`); an
operation belongs to the innermost part whose forward is running, or whose backward is running
(from the moment gradients reach the part's outputs until they reach its inputs); anything else
belongs to `rest`. `count()` takes the parts from the object `fn` is bound to when it has a
`flop_parts()` method (every vlp-bench Method), else from the direct children of a module `fn`.

For training (vlp_bench.train.trainer, and what costs a step without training: costmodel,
validate): `count_step` replays one training step of a Method under the counter without
changing the run, and `flop_summary` / `stage_summary` turn the counts into results.json's fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils import flop_counter as _tfc
from torch.utils._pytree import tree_flatten, tree_map
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.hooks import RemovableHandle

from vlp_bench.method import Method, Stage, StepOutput
from vlp_bench.train.compile import eager

UNIT = "FLOP (2 per multiply-add)"
PASSES = ("forward", "backward")
aten = torch.ops.aten


def _cpu_sdpa(query, key, value, *args, out_val=None, **kwargs) -> int:
    return _tfc.sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_val=None, **kwargs) -> int:
    return _tfc.sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


def _grouped(formula, backward: bool):
    """An attention formula that also takes grouped keys (GQA: fewer key/value heads than query
    heads, as Llama 3 and most recent LLMs run them with SDPA's enable_gqa): every query head
    still attends over all keys, so the cost is that of the keys repeated per query head.
    PyTorch's own formulas reject such shapes."""

    def count(*args, out_val=None, **kwargs) -> int:
        q, k, v = args[1:4] if backward else args[:3]  # (B, H, L, D)
        if k.shape[-3] == q.shape[-3]:
            return formula(*args, out_val=out_val, **kwargs)
        k_shape, v_shape = (t.shape[:-3] + (q.shape[-3],) + t.shape[-2:] for t in (k, v))
        if backward:
            return _tfc.sdpa_backward_flop_count(args[0].shape, q.shape, k_shape, v_shape)
        return _tfc.sdpa_flop_count(q.shape, k_shape, v_shape)

    return count


# PyTorch's formulas (shape-based, 2 FLOPs per multiply-add), plus the CPU fused attention kernels
# that torch.utils.flop_counter does not register (it reports 0 for attention on CPU); the fused
# attention kernels (B, H, L, D) also take grouped keys.
FORMULAS = {**_tfc.flop_registry,
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward}
for _name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
              "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
    for _op, _backward in ((getattr(aten, _name, None), False), (getattr(aten, _name + "_backward", None), True)):
        if _op is not None and _op in FORMULAS:
            FORMULAS[_op] = _grouped(FORMULAS[_op], _backward)


@dataclass
class FlopCount:
    """FLOPs by part and pass: by_part[part][pass], pass in ("forward", "backward")."""

    by_part: dict[str, dict[str, int]] = field(default_factory=dict)
    unit: str = UNIT

    @property
    def forward(self) -> int:
        return sum(p["forward"] for p in self.by_part.values())

    @property
    def backward(self) -> int:
        return sum(p["backward"] for p in self.by_part.values())

    @property
    def total(self) -> int:
        return self.forward + self.backward

    def add(self, part: str, pass_: str, flops: float) -> None:
        self.by_part.setdefault(part, dict.fromkeys(PASSES, 0))[pass_] += flops

    def update(self, other: FlopCount) -> FlopCount:
        """Add `other` into this count, in place (into the by_part dict it was built on)."""
        for part, passes in other.by_part.items():
            for pass_, n in passes.items():
                self.add(part, pass_, n)
        return self

    def scaled(self, factor: float) -> dict:
        """by_part with every figure times `factor` (e.g. 1 / batch size: per sample), as floats."""
        return {part: {p: n * factor for p, n in passes.items()} for part, passes in self.by_part.items()}


class _FusedAttentionOnMeta(TorchFunctionMode):
    """On the meta device, route scaled_dot_product_attention to the fused kernel (which has meta
    shapes forward and backward), so meta counts equal those of a real run; and answer True to a
    whole-tensor `.all()`, the data-dependent checks Hugging Face models make on their masks and
    positions ("no padding", "not packed"): what the cost model's equal-length captions are."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention and args[0].is_meta:
            return _fused_attention(*args, **kwargs)
        if func in (torch.Tensor.all, torch.all) and len(args) == 1 and not kwargs and args[0].is_meta:
            return torch.tensor(True)
        return func(*args, **kwargs)


def _fused_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                     enable_gqa=False):
    if enable_gqa and key.shape[-3] != query.shape[-3]:  # grouped keys: one per query head, as run
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device)
    return aten._scaled_dot_product_flash_attention_for_cpu(
        query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale)[0]


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _grad_tensors(obj) -> list[torch.Tensor]:
    return [t for t in tree_flatten(obj)[0] if isinstance(t, torch.Tensor) and t.requires_grad]


class FlopCounter(TorchDispatchMode):
    """A dispatch mode that adds up FLOPs by part and pass; `result` is the FlopCount so far."""

    def __init__(self, parts: dict[str, nn.Module | list[nn.Module]] | None = None, rest: str = "other"):
        super().__init__()
        self.parts = dict(parts or {})
        self.rest = rest
        self.result = FlopCount()
        self._forward: list[str] = []  # parts whose forward is running, innermost last
        self._backward: list[str] = []  # parts whose backward is running
        self._handles: list[RemovableHandle] = []

    def _current(self) -> str:
        stack = self._backward if _in_backward() else self._forward
        return stack[-1] if stack else self.rest

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = FORMULAS.get(func._overloadpacket)
        if formula is not None:
            self.result.add(self._current(), "backward" if _in_backward() else "forward",
                            int(formula(*args, **kwargs, out_val=out)))
        return out

    def _hook(self, name: str, module: nn.Module) -> None:
        def pre(mod, args, kwargs):
            self._forward.append(name)
            # The part reads aliases of its inputs: an input also used elsewhere (a stream feeding a
            # head and a reconstructor) gets its gradient only when every user is done, the alias
            # when this part is. Its backward ends when the gradients of all its inputs are computed.
            args, kwargs = tree_map(lambda t: t.view_as(t) if isinstance(t, torch.Tensor) and t.requires_grad
                                    else t, (args, kwargs))
            inputs = _grad_tensors((args, kwargs))
            if inputs:
                self._handles.append(torch.autograd.graph.register_multi_grad_hook(
                    inputs, lambda grads: _remove_last(self._backward, name)))
            return args, kwargs

        def post(mod, args, kwargs, output):
            _remove_last(self._forward, name)
            outputs = _grad_tensors(output)
            if outputs:  # and starts when the first gradient reaches one of its outputs
                self._handles.append(torch.autograd.graph.register_multi_grad_hook(
                    outputs, lambda grad: self._backward.append(name), mode="any"))

        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        self._handles.append(module.register_forward_hook(post, with_kwargs=True))

    def __enter__(self):
        for name, modules in self.parts.items():
            for module in modules if isinstance(modules, (list, tuple)) else [modules]:
                self._hook(name, module)
        self._meta = _FusedAttentionOnMeta()
        self._meta.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        out = super().__exit__(*exc)
        self._meta.__exit__(*exc)
        return out


def _remove_last(stack: list[str], name: str) -> None:
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] == name:
            del stack[i]
            return


def default_parts(fn) -> tuple[dict[str, nn.Module], str]:
    owner = fn if isinstance(fn, nn.Module) else getattr(fn, "__self__", None)
    if owner is not None and hasattr(owner, "flop_parts"):
        return owner.flop_parts()
    if isinstance(owner, nn.Module):
        return dict(owner.named_children()), "other"
    return {}, "other"


def count(fn, *args, **kwargs) -> FlopCount:
    """Run fn(*args, **kwargs) once and return the FLOPs it executed (see the module docstring)."""
    parts, rest = default_parts(fn)
    with FlopCounter(parts, rest) as counter:
        fn(*args, **kwargs)
    return counter.result


def count_step(method: Method, batch: dict, stage: Stage, autocast) -> tuple[FlopCount, StepOutput]:
    """The FLOPs of one forward and backward of training_loss(batch, stage), by part and pass.
    The RNG is restored afterwards and gradients are returned rather than stored, so the real step
    that follows runs exactly as if this replay had not happened."""
    leaves = [p for p in method.parameters() if p.requires_grad]  # the leaves .backward() reaches
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    # eagerly: the counter must see every operation, and a compiled block first called under the
    # counter's dispatch mode would be marked "do not compile" for good
    with eager(), torch.random.fork_rng(devices=devices), FlopCounter(*method.flop_parts()) as counter:
        with autocast:
            out = method.training_loss(batch, stage)
        torch.autograd.grad(out.loss, leaves, allow_unused=True)
    return counter.result, out


def flop_summary(by_part: dict, samples: int) -> dict:
    """results.json's FLOP fields from by_part[part][pass] totals over `samples` samples."""
    count = FlopCount(by_part)
    samples = max(samples, 1)
    return {"flops_unit": UNIT, "train_flops": count.total, "train_flops_forward": count.forward,
            "train_flops_backward": count.backward, "train_flops_per_sample": count.total / samples,
            "flops_by_part": count.by_part, "flops_per_sample_by_part": count.scaled(1 / samples)}


def stage_summary(stage: dict, with_flops: bool) -> dict:
    """One entry of results.json's cost.stages from the trainer's per-stage counters (name, steps,
    samples, train_wall_s, flops by part): the FLOPs as flop_summary's fields, or none."""
    out = {k: v for k, v in stage.items() if k != "flops"}
    return {**out, **flop_summary(stage["flops"], stage["samples"])} if with_flops else out
