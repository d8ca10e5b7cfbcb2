"""The claims ledger: each claim of the source papers, the runs that test it, and its verdict, by one
rule (docs/claims.md). A pure function of result files: `ledger(paths)` reads run directories (any
`vlp-bench run` or `vlp-bench claims` output), finds the runs each claim needs by their records
(method, tiny world, clips or images, share of the training set) and judges every claim on every
world it finds.

A claim compares two arms (a method in a study) with paired seeds and reads one interval at 95%:
- speed-up "k x" (time-to-target, vlp_bench.metrics.targets): reproduced when the interval is above
  1 and reaches `about` x k; refuted when it lies below `about` x k; else inconclusive;
- "better": the paired quality ratio's interval above 1 reproduces it; below 1 + margin (at most a
  marginal gain) refutes it;
- "near" (no noticeable drop): the ratio's interval above 1 - margin reproduces it; below refutes it;
- "throughput k at a small quality cost": the encoder's throughput ratio (its FLOPs per sample at
  the largest scale costed) at or above `about` x k and the quality ratio "near".
One seed gives no interval: inconclusive, with the seeds a decision would need where a spread is
known. A claim judged on several worlds is "robust" when every world gives the same verdict and
"fragile" when they differ (its verdict is then inconclusive).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlp_bench.errors import UserError, suggest
from vlp_bench.metrics.verdicts import LEVEL, paired_speedup, seeds_needed
from vlp_bench.reports.claims_scale import paper_bound, read_json, throughput_of
from vlp_bench.reports.summary import compute_speedups, load_runs, metric_value

REPRODUCED, REFUTED, INCONCLUSIVE = "reproduced", "refuted", "inconclusive"
ROBUST, FRAGILE = "robust", "fragile"


@dataclass(frozen=True)
class Study:
    """One `vlp-bench run` a world needs: its methods, tasks and the settings it changes."""

    name: str
    methods: tuple[str, ...]
    tasks: tuple[str, ...]
    reference: str
    settings: dict = field(default_factory=dict)  # {"section.key": value} over the ledger's config

    @property
    def fraction(self) -> float:
        return float(self.settings.get("data.train_fraction", 1.0))

    @property
    def clips(self) -> bool:
        return "video_caption" in self.tasks


# The text-side family is judged on fine-tuned VQA, as FLM evaluates it, and evaluates every 300 steps
# (at 0 and at the end): each of its evaluations first fine-tunes on VQA (200 steps), which would
# otherwise triple its cost.
STUDIES = {s.name: s for s in (
    Study("bridges", ("baseline", "simvlg", "tome-vit"), ("caption",), "baseline"),
    Study("blip2", ("blip2", "blip2-1stage"), ("caption", "vqa"), "blip2"),
    Study("text-side", ("mlm", "flm"), ("vqa",), "mlm", {"train.eval_every": 300}),
    Study("video", ("simvlg", "simvlg-video"), ("video_caption",), "simvlg"),
)}


def data_study(fraction: float) -> Study:
    return Study(f"data-{fraction:g}", ("simvlg",), ("caption",), "simvlg", {"data.train_fraction": fraction})


@dataclass(frozen=True)
class Claim:
    id: str
    source: str
    statement: str  # as the paper states it
    kind: str  # "speedup" | "better" | "near" | "throughput"
    method: tuple[str, str]  # (study, method): the arm the claim is about
    reference: tuple[str, str]  # the arm it is compared with
    metric: str  # speed-ups: the validation curve's task.key; quality: the test split's
    factor: float = 1.0  # the claimed speed-up or throughput
    curve: str = ""  # a validation curve shown beside the verdict (task.key)
    paper_samples: tuple[float, float] | None = None  # training samples of each arm's released config
    stated_compute: str = ""  # what the paper says its training cost, where it says it


CLAIMS = (
    Claim("simvlg-5x-blip2", "SimVLG", "about 5x faster training than two-stage BLIP-2 without a noticeable drop",
          "speedup", ("bridges", "simvlg"), ("blip2", "blip2"), "caption.CIDEr", 5.0,
          # recipes/simvlg-opt2.7b.toml: 250k steps x 1,600; recipes/blip2-opt2.7b.toml: 330k x 1,920
          paper_samples=(250_000 * 1600, 330_000 * 1920),
          stated_compute="BLIP-2: under 6 + 3 days on 16 A100s (144 A100-days) for its largest model "
                         "(ViT-g + FlanT5-XXL)"),
    Claim("blip2-one-stage-collapse", "BLIP-2", "without the representation-learning stage (one stage), "
          "zero-shot VQA is substantially lower (with OPT it also falls as training goes on: shown by the "
          "validation curve, not judged)", "better", ("blip2", "blip2"),
          ("blip2", "blip2-1stage"), "vqa.overall", curve="vqa.overall"),
    Claim("flm-2.5x-mlm", "FLM", "2.5x less pre-training time than MLM to comparable downstream quality",
          "speedup", ("text-side", "flm"), ("text-side", "mlm"), "vqa.overall", 2.5),
    Claim("tome-2x-throughput", "ToMe", "about 2x the ViT's throughput at a small drop in quality",
          "throughput", ("bridges", "tome-vit"), ("bridges", "baseline"), "caption.CIDEr", 2.0),
    Claim("simvlg-video", "SimVLG", "temporal attention in the frozen ViT captions video better than the "
          "frame average", "better", ("video", "simvlg-video"), ("video", "simvlg"), "video_caption.CIDEr"),
    Claim("simvlg-tenth-data", "SimVLG", "near BLIP-2's quality with 1/10 of its training data", "near",
          ("data-0.1", "simvlg"), ("blip2", "blip2"), "caption.CIDEr"),
)


def select(only: list[str]) -> list[Claim]:
    """The claims named in `only` (all when empty); an unknown id is a one-line error."""
    ids = [c.id for c in CLAIMS]
    for name in only:
        if name not in ids:
            raise UserError(f"unknown claim '{name}'{suggest(name, ids)}; claims: {', '.join(ids)}")
    return [c for c in CLAIMS if not only or c.id in only]


def studies_for(claims: list[Claim], cfg) -> list[Study]:
    """The studies the claims read, in the order of STUDIES (the data sweep last); `cfg` is the
    ledger's ClaimsConfig (its data fractions)."""
    names = {arm[0] for c in claims for arm in (c.method, c.reference)}
    data = [study_of(n) for n in sorted(names) if n not in STUDIES]  # a claim's own share of the data
    sweep = [data_study(f) for f in cfg.data_fractions] if data else []
    out = [s for s in STUDIES.values() if s.name in names or (sweep and s.name == "bridges")]  # + its full-data point
    return out + list({s.name: s for s in data + sweep}.values())


def study_of(name: str) -> Study:
    """A study by name: one of STUDIES, or "data-F" (SimVLG on a share F of the training set)."""
    return STUDIES.get(name) or data_study(float(name.partition("-")[2]))


# ----------------------------------------------------------------------------- reading runs


def world_of(rec: dict) -> str:
    """The tiny world a run ran on: the world's and the backbones' seeds (the same names a ledger uses)."""
    cfg = rec.get("config", {})
    seeds = [str(cfg.get(s, {}).get("seed", "?")) for s in ("world", "vision", "llm", "bert")]
    return f"world {seeds[0]}" if len(set(seeds)) == 1 else "world " + "/".join(seeds) + " (world/vision/llm/bert seeds)"


def arm_of(rec: dict) -> tuple[str, float, bool]:
    """What a run is as an arm: (method, share of the training set, on clips)."""
    cfg = rec.get("config", {})
    clips = "video_caption" in cfg.get("experiment", {}).get("tasks", [])
    return rec["method"], float(cfg.get("data", {}).get("train_fraction", 1.0)), clips


def find_runs(paths) -> list[Path]:
    """The run directories at or under `paths`, at any depth (a ledger's world-K/STUDY/ too); never
    re-evaluations (evals/) nor tuning trials (tune/), which are not seeds of the compared arms."""
    out = []
    for p in map(Path, paths):
        if (p / "results.json").is_file():
            out.append(p)
            continue
        found = sorted(f.parent for f in p.rglob("results.json")
                       if not {"evals", "tune"} & set(f.relative_to(p).parts[:-1])) if p.is_dir() else []
        if not found:
            raise UserError(f"{p}: no run directory (results.json) at or under it")
        out.extend(found)
    return out


def group_runs(paths) -> dict[str, dict[tuple, list]]:
    """{world: {arm: [finished runs, by seed]}} of every run under `paths`."""
    out: dict[str, dict[tuple, list]] = {}
    for run in load_runs(find_runs(paths)):
        if run.finished:
            out.setdefault(world_of(run.rec), {}).setdefault(arm_of(run.rec), []).append(run)
    for world, arms in out.items():
        for arm, runs in arms.items():
            seen: dict = {}
            for r in runs:
                if r.rec["seed"] in seen:
                    raise UserError(f"two runs of {arm[0]} with seed {r.rec['seed']} on {world}: {seen[r.rec['seed']]} "
                                    f"and {r.dir}; judge one of them (--from the directories to compare)")
                seen[r.rec["seed"]] = r.dir
    return {w: {a: sorted(rs, key=lambda r: r.rec["seed"]) for a, rs in arms.items()} for w, arms in sorted(out.items())}


def arm_key(arm: tuple[str, str]) -> tuple:
    """A claim's arm (study, method) as the runs' records name it: (method, share, on clips)."""
    study = study_of(arm[0])
    return arm[1], study.fraction, study.clips


def tuned_label(runs: list) -> str:
    """"tuned" when every run trained with its method's own tuned values, "default" when none did."""
    flags = {bool(r.rec["config"]["experiment"].get("train_by_method", {}).get(r.method)) for r in runs}
    return "tuned" if flags == {True} else "default" if flags == {False} else "mixed"


# ----------------------------------------------------------------------------- judging


def interval_verdict(s: dict, low_bound: float, high_bound: float) -> str:
    """refuted when the interval's high end is below `high_bound` (the claimed effect excluded, which
    decides first: "faster, but by less than claimed" refutes the claim); else reproduced when its
    low end is above `low_bound`; else, or with no interval, inconclusive."""
    if s.get("ci_low") is None:
        return INCONCLUSIVE
    return REFUTED if s["ci_high"] < high_bound else REPRODUCED if s["ci_low"] > low_bound else INCONCLUSIVE


def needed(s: dict, bounds: list[float]) -> int | None:
    """Seeds a decision would need at the observed mean and spread (the nearest bound)."""
    d = np.log(np.asarray(s.get("per_seed") or [], dtype=float))
    if len(d) < 2:
        return None
    options = [n for b in bounds if (n := seeds_needed(float(d.mean()) - math.log(b), float(d.std(ddof=1)))) is not None]
    return min(options) if options else None


def quality_ratio(a: list, b: list, metric: str) -> dict | None:
    """The paired ratio a/b of the runs' test `metric`, over the seeds both have."""
    va = {r.rec["seed"]: metric_value(r.rec, metric) for r in a}
    vb = {r.rec["seed"]: metric_value(r.rec, metric) for r in b}
    both = sorted(s for s in set(va) & set(vb) if va[s] is not None and vb[s] is not None)
    seeds = [s for s in both if va[s] > 0 and vb[s] > 0]  # a ratio needs both above 0 (a score of 0 is said)
    if not seeds:
        return None
    out = paired_speedup([va[s] for s in seeds], [vb[s] for s in seeds], LEVEL)
    return {**out, "seeds": seeds, "method_values": [va[s] for s in seeds], "reference_values": [vb[s] for s in seeds],
            "left_out_at_zero": [s for s in both if s not in seeds]}


def judge_speedup(claim: Claim, a: list, b: list, about: float) -> dict:
    runs = a + b
    try:
        sp = compute_speedups([r.dir for r in runs], [r.rec for r in runs], claim.metric, None, claim.reference[1])
    except UserError as e:  # e.g. no learning curve of the metric
        return {"metric": claim.metric, "measured": {}, "verdict": INCONCLUSIVE, "why_no_number": str(e),
                "seeds_needed": None}
    entry = sp["methods"].get(claim.method[1], {})
    out = {"target": sp["target"], "target_fraction": 0.8, "metric": claim.metric}
    time, flops = entry.get("time_speedup"), entry.get("flops_speedup")
    bound = about * claim.factor
    verdict = interval_verdict(time, 1.0, bound) if time else INCONCLUSIVE
    if time is None:  # the headline target has no number: the highest grid target both reach. It is
        curve = sp["curve"]["methods"].get(claim.method[1], {})  # judged there only when every seed of the
        times, flop_list = curve.get("time", []), curve.get("flops", [])  # method met the headline target
        both = [k for k, t in enumerate(times) if "value" in t]  # (a reference seed that fell short is
        if both:  # no fault of the method's); a method that fell short may be a quality drop: shown, not judged
            k = both[-1]
            time = times[k]
            flops = flop_list[k] if k < len(flop_list) and "value" in flop_list[k] else None
            out.update(target=time["target"], target_fraction=sp["curve"]["fractions"][k])
            reached = (entry.get("time_to_target_s") or {}).get("per_seed", [])
            if reached and all(c is not None and c > 0 for c in reached):
                verdict = interval_verdict(time, 1.0, bound)
        out["why_no_number"] = _why_not(entry, sp, claim)
    return {**out, "measured": {"time": time, "flops": flops}, "verdict": verdict,
            "seeds_needed": needed(time, [1.0, bound]) if time and verdict == INCONCLUSIVE else None}


def _why_not(entry: dict, sp: dict, claim: Claim) -> str:
    costs = (entry.get("time_to_target_s") or {}).get("per_seed", [])
    ref = (sp["methods"].get(claim.reference[1], {}).get("time_to_target_s") or {}).get("per_seed", [])
    if any(c == 0 for c in costs + ref):
        return "reached untrained: the step-0 evaluation already meets the target"
    if any(c is None for c in ref):
        return f"the reference did not reach the target in {sum(c is None for c in ref)} of {len(ref)} seeds"
    if any(c is None for c in costs):
        return f"the method did not reach the target in {sum(c is None for c in costs)} of {len(costs)} seeds"
    return "no paired seeds"


def judge_quality(claim: Claim, a: list, b: list, margin: float, about: float, throughput: dict | None) -> dict:
    q = quality_ratio(a, b, claim.metric)
    out = {"metric": claim.metric, "measured": {"quality": q}}
    if claim.kind == "throughput":
        out["measured"]["throughput"] = throughput
        if throughput is not None and throughput["value"] < about * claim.factor:  # refuted whatever the quality
            return {**out, "verdict": REFUTED, "seeds_needed": None}
    if q is None:
        return {**out, "verdict": INCONCLUSIVE, "why_no_number": "no seed has both arms' test metric",
                "seeds_needed": None}
    bounds = [1.0, 1.0 + margin] if claim.kind == "better" else [1.0 - margin]
    verdict = interval_verdict(q, bounds[0], bounds[-1])
    if claim.kind == "throughput" and throughput is None and verdict == REPRODUCED:
        verdict = INCONCLUSIVE  # the quality holds; no scale says the throughput does
    return {**out, "verdict": verdict, "seeds_needed": needed(q, bounds) if verdict == INCONCLUSIVE else None}


def curve_means(runs: list, metric: str) -> list[dict]:
    """The mean validation `metric` over seeds at each evaluated step: [{step, value, seeds}]."""
    task, _, key = metric.partition(".")
    by_step: dict[int, list] = {}
    for r in runs:
        for row in r.rows:
            v = row.get("eval", {}).get(task, {}).get(key) if row.get("split") == "val" else None
            if isinstance(v, (int, float)):
                by_step.setdefault(row["step"], []).append(v)
    return [{"step": s, "value": float(np.mean(v)), "seeds": len(v)} for s, v in sorted(by_step.items())]


# ----------------------------------------------------------------------------- the ledger


def judge_world(claim: Claim, a: list, b: list, cfg: dict, bench: list[dict]) -> dict:
    bound = paper_bound(claim, a, b, bench)
    if claim.kind == "speedup":
        out = judge_speedup(claim, a, b, cfg["about"])
    else:
        out = judge_quality(claim, a, b, cfg["margin"], cfg["about"], throughput_of(claim, bound))
    out.update(seeds=sorted({r.rec["seed"] for r in a} & {r.rec["seed"] for r in b}), tuning=tuned_label(a + b),
               paper_scale=bound)
    if claim.curve:
        out["curves"] = {"method": curve_means(a, claim.curve), "reference": curve_means(b, claim.curve)}
    return out


def combine(worlds: dict[str, dict]) -> tuple[str, str | None]:
    """The claim's verdict over its worlds and its robustness (None with one world)."""
    verdicts = {w["verdict"] for w in worlds.values()}
    if len(worlds) < 2:
        return (verdicts.pop() if verdicts else INCONCLUSIVE), None
    return (verdicts.pop(), ROBUST) if len(verdicts) == 1 else (INCONCLUSIVE, FRAGILE)


def ledger(paths, bench_files=(), settings: dict | None = None) -> dict:
    """Every claim judged on every world the runs under `paths` hold (claims.json). `settings`:
    the margin and `about` (claims.margin, claims.about), else the ledger's saved config, else the defaults."""
    cfg = {"margin": 0.05, "about": 0.8}
    for p in map(Path, paths):
        saved = p / "ledger.json"
        if saved.is_file():
            cfg.update({k: v for k, v in read_json(saved, "a ledger's config").get("claims", {}).items() if k in cfg})
    cfg.update(settings or {})
    bench = [read_json(f, "a `vlp-bench bench --json` table") for f in bench_files]
    if not all(isinstance(t, dict) for t in bench):
        raise UserError("--bench: each file must be a `vlp-bench bench --json` table (a JSON object)")
    worlds = group_runs(paths)
    claims = []
    for claim in CLAIMS:
        per_world = {}
        for world, arms in worlds.items():
            a, b = arms.get(arm_key(claim.method)), arms.get(arm_key(claim.reference))
            if a and b:
                per_world[world] = judge_world(claim, a, b, cfg, bench)
        verdict, robustness = combine(per_world)
        claims.append({"id": claim.id, "source": claim.source, "statement": claim.statement, "kind": claim.kind,
                       "method": claim.method[1], "reference": claim.reference[1], "factor": claim.factor,
                       "metric": claim.metric, "measured": bool(per_world), "verdict": verdict if per_world else None,
                       "robustness": robustness, "worlds": per_world})
    return {"schema_version": 1, "level": LEVEL, "settings": cfg, "worlds": list(worlds),
            "claims": claims, "sweep": data_sweep(worlds)}


def data_sweep(worlds: dict) -> list[dict]:
    """SimVLG's test CIDEr at each share of the training set, per world: [{world, fraction, values}]."""
    out = []
    for world, arms in worlds.items():
        for (method, fraction, clips), runs in sorted(arms.items(), key=lambda kv: kv[0][1]):
            if method == "simvlg" and not clips:
                out.append({"world": world, "fraction": fraction,
                            "values": [v for r in runs if (v := metric_value(r.rec, "caption.CIDEr")) is not None]})
    return out if any(e["fraction"] < 1 for e in out) else []
