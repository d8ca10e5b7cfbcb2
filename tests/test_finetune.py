"""Task fine-tuning (tasks.NAME.finetune_steps): rows with a prompt each, whose loss is their target
alone; a fine-tuning phase on a copy of the weights that gives them back and is recorded apart from
the training cost; any method can use it; and every VQA figure says zero-shot or fine-tuned."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import random_backbones
from test_trainer import CAPTIONS, batches, small_baseline
from vlp_bench.errors import UserError
from vlp_bench.method import Stage
from vlp_bench.nn.generation import lm_rows, prefix_lm_loss
from vlp_bench.registry import METHODS, TASKS
from vlp_bench.results import MetricsLog
from vlp_bench.train.trainer import Evaluation, Phase, TrainConfig, finetune, train

QUESTIONS = ["Question: what color? Short answer:", "Question: how many? Short answer:",
             "Question: where is the star? Short answer:", "Question: what shape is left of the blue square? Short answer:"]
CPU = torch.device("cpu")


def question_batches(seed=0, n=4):
    """batches() with one prompt per row, as a task's fine-tuning gives them."""
    for batch in batches(seed, n):
        yield {**batch, "prompt": [QUESTIONS[CAPTIONS.index(c)] for c in batch["captions"]]}


def weights(method) -> dict:
    return {n: p.detach().clone() for n, p in method.named_parameters()}


def test_per_row_prompts_score_their_targets_only():
    method = small_baseline().eval()
    tok, llm = method.tokenizer, method.llm
    prefix = torch.randn(len(QUESTIONS), 5, llm.config.hidden_size)
    targets = ["red", "two", "left of the circle", "a cross"]
    with torch.no_grad():
        loss, n = prefix_lm_loss(llm, tok, prefix, QUESTIONS, targets)
        alone = [prefix_lm_loss(llm, tok, prefix[i:i + 1], QUESTIONS[i], [targets[i]]) for i in range(len(targets))]
    # the mean over every target token (its EOS included) and no prompt token: each row scored alone, weighted
    assert n == sum(len(tok(" " + t, add_special_tokens=False).input_ids) + 1 for t in targets) == sum(k for _, k in alone)
    assert loss.item() == pytest.approx(sum(float(l) * k for l, k in alone) / n, rel=1e-5)
    prompt_ids, rows = lm_rows(tok, QUESTIONS, targets)
    assert [r[:len(p)] for r, p in zip(rows, prompt_ids)] == prompt_ids  # each row starts with its own prompt
    with pytest.raises(ValueError, match="3 prompts for 4 targets"):
        lm_rows(tok, QUESTIONS[:3], targets)


def test_the_lm_head_runs_only_where_the_loss_reads_it():
    """prefix_lm_loss asks for the logits of the last L + 1 positions (L text tokens), not the soft
    prompt's, and its loss is the one computed from every position's logits (docs/fidelity.md)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    method = small_baseline().eval()
    tok, llm = method.tokenizer, method.llm
    prefix = torch.randn(3, 7, llm.config.hidden_size)
    targets = ["a red circle", "two blue squares left of a star", "a cross"]
    import functools

    kept = []
    forward = llm.forward
    llm.forward = functools.wraps(forward)(lambda *a, **kw: kept.append(kw.get("logits_to_keep")) or forward(*a, **kw))
    with torch.no_grad(), FlopCounterMode(display=False) as flops:
        loss, _ = prefix_lm_loss(llm, tok, prefix, "a photo of", targets)
    prompt_ids, rows = lm_rows(tok, "a photo of", targets)
    L = max(map(len, rows))
    assert kept == [L + 1]
    head = 2 * 3 * (L + 1) * llm.config.hidden_size * llm.config.vocab_size  # only L + 1 positions' logits
    full_head = 2 * 3 * (7 + L) * llm.config.hidden_size * llm.config.vocab_size
    llm.forward = forward
    with torch.no_grad(), FlopCounterMode(display=False) as all_flops:
        ids = torch.full((3, L), tok.pad_token_id)
        valid = torch.zeros(3, L, dtype=torch.bool)
        for r, row in enumerate(rows):
            ids[r, : len(row)], valid[r, : len(row)] = torch.tensor(row), True
        embeds = torch.cat([prefix, llm.get_input_embeddings()(ids)], 1)
        mask = torch.cat([torch.ones(3, 7, dtype=torch.long), valid.long()], 1)
        logits = llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits[:, 6:-1]
        labels = ids.masked_fill(~valid, -100)
        labels[:, : len(prompt_ids)] = -100
        reference = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    assert all_flops.get_total_flops() - flops.get_total_flops() == full_head - head


def test_a_prompt_per_row_that_are_all_equal_is_the_shared_prompt():
    method = small_baseline()
    batch = next(batches())
    per_row = {**batch, "prompt": [batch["prompt"]] * len(batch["captions"])}
    stage = method.stages(1)[0]
    torch.manual_seed(0)
    shared = method.training_loss(batch, stage)
    torch.manual_seed(0)
    listed = method.training_loss(per_row, stage)
    assert torch.equal(shared.loss, listed.loss) and shared.weight == listed.weight
    assert method.shape_key(batch, stage) == method.shape_key(per_row, stage)


def test_finetuning_gives_the_weights_back_and_is_the_same_every_time():
    method = small_baseline()
    before, rng = weights(method), torch.random.get_rng_state()
    stage = method.task_stage(3, total_steps=10)
    cfg = TrainConfig(steps=10, batch_size=4, warmup_steps=5, log_every=5)
    tuned = []
    for _ in range(2):
        with finetune(method, stage, lambda: question_batches(seed=7), cfg, CPU) as cost:
            tuned.append(weights(method))
        assert all(torch.equal(p, before[n]) for n, p in method.named_parameters())  # all given back
        assert torch.equal(torch.random.get_rng_state(), rng)  # its own random stream
    changed = {n for n in before if not torch.equal(tuned[0][n], before[n])}
    assert changed and not any(n.startswith(("llm.", "vision.")) for n in changed)  # the bridge, the LLM frozen
    assert all(torch.equal(tuned[0][n], tuned[1][n]) for n in before)  # same batches, same start: same weights
    assert cost["steps"] == 3 and cost["samples_seen"] == 12 and cost["train_flops"] > 0 and cost["final_loss"] > 0
    with finetune(method, Stage("train", 0), lambda: question_batches(), cfg, CPU) as nothing:
        assert nothing is None  # no steps: no phase


def test_the_task_stage_is_the_decoder_stage_else_the_last_pretraining_stage():
    torch.manual_seed(0)
    blip2 = METHODS.get("blip2")
    method = blip2(dataclasses.replace(blip2.Config(), width=32, heads=2, depth=2, num_queries=4), random_backbones())
    assert method.task_stage(5, total_steps=100) == Stage("stage2", 5)  # the LLM projection's stage, not stage 1
    baseline = small_baseline()
    assert baseline.task_stage(7, total_steps=100) == Stage("train", 7)
    baseline.decoder_stage = lambda: Stage("decoder", 100)  # as the text-side family's: the stream that decodes
    assert baseline.task_stage(9, total_steps=100) == Stage("decoder", 9)


def test_evaluation_phases_are_recorded_apart_and_leave_training_unchanged(tmp_path):
    """Each task after its own phase, from the weights as they stand: a task's fine-tuning is the same
    with or without a decoder phase before the other tasks; each cost is recorded in the row; the
    training itself is unchanged."""
    cfg = TrainConfig(steps=4, batch_size=4, warmup_steps=1, log_every=1, eval_every=2, warmup_exclude=1)
    seen = []

    def run(decoder: bool | None):  # no evaluation; the task's phase alone; after a decoder phase
        method = small_baseline()

        def evaluate(step, tasks):  # what each task sees: a checksum of the trainable weights
            return {t: {"w": round(sum(float(p.detach().sum()) for p in method.parameters() if p.requires_grad), 5)}
                    for t in tasks}

        phases = [Phase(["zero"], Stage("train", 2) if decoder else None, lambda: batches(seed=5)),
                  Phase(["tuned"], method.task_stage(2, cfg.steps), question_batches, "tuned")]
        log = MetricsLog(tmp_path / f"{decoder}.jsonl")
        torch.manual_seed(0)
        train(method, batches(), dataclasses.replace(cfg, eval_every=0 if decoder is None else 2), CPU, log,
              Evaluation(evaluate, phases, on_eval=lambda step, metrics: seen.append((step, sorted(metrics)))),
              progress=False)
        return log.rows, weights(method)

    runs = [run(decoder) for decoder in (None, False, True)]
    (plain, w_plain), (alone, _), (after, w_after) = runs
    assert all(torch.equal(w_plain[n], w_after[n]) for n in w_plain)
    assert [r["loss"] for r in plain if "loss" in r] == [r["loss"] for r in after if "loss" in r]
    alone, after = [r for r in alone if "eval" in r], [r for r in after if "eval" in r]
    assert [r["step"] for r in after] == [0, 2, 4] and seen == [(s, ["tuned", "zero"]) for s in (0, 2, 4)] * 2
    for a, b in zip(alone, after):
        assert a["eval"]["tuned"] == b["eval"]["tuned"] != b["eval"]["zero"]  # from the pre-trained weights
        assert "decoder" not in a and b["decoder"]["steps"] == 2
        assert a["task_finetune"]["tuned"]["steps"] == b["task_finetune"]["tuned"]["steps"] == 2


def test_the_finetuning_steps_and_the_protocol_label():
    vqa_cls, caption = TASKS.get("vqa"), TASKS.get("caption")
    baseline, tuned = small_baseline(), small_baseline()
    tuned.task_finetune_steps = 5  # as the text-side family sets its default (a class attribute there)

    def vqa(steps):
        return vqa_cls(vqa_cls.Config(finetune_steps=steps), ".", None)

    assert vqa(-1).finetune_steps(baseline) == 0 and vqa(-1).protocol(baseline) == "zero-shot"
    assert vqa(-1).finetune_steps(tuned) == 5 and vqa(-1).protocol(tuned) == "fine-tuned (5 steps)"
    assert vqa(0).protocol(tuned) == "zero-shot" and vqa(20).protocol(baseline) == "fine-tuned (20 steps)"
    cap = caption(caption.Config(), ".", None)
    assert cap.finetune_steps(tuned) == 0 and cap.protocol(tuned) is None  # a task that cannot fine-tune
    from vlp_bench.experiment import load_config

    with pytest.raises(UserError, match=r"^tasks.vqa: finetune_steps must be >= 0, or -1 for the method's default, got -2$"):
        load_config(None, ["tasks.vqa.finetune_steps=-2"])


def test_summary_and_report_label_every_vqa_figure(tmp_path):
    from vlp_bench.reports.html import method_table
    from vlp_bench.reports.summary import Run, metric_label, summary_table

    def rec(method, seed, vqa):
        return {"run_id": f"{method}-seed{seed}", "method": method, "seed": seed, "status": "finished",
                "metrics": {"vqa": {"overall": 40.0, **vqa}}, "cost": {}}

    recs = [rec("baseline", 0, {"protocol": "fine-tuned (50 steps)"}), rec("simvlg", 0, {})]  # {}: a v4 record
    table = summary_table(recs)
    assert "VQA as" in table and "fine-tuned (50 steps)" in table and "zero-shot" in table
    frame = method_table([Run(tmp_path, r, []) for r in recs], None, "vqa.overall")
    assert list(frame["VQA protocol"]) == ["fine-tuned (50 steps)", "zero-shot"]
    assert list(frame.columns).index("VQA protocol") == list(frame.columns).index("VQA acc. % (test)") + 1
    assert metric_label(recs, "vqa.overall") == "vqa.overall (fine-tuned (50 steps) / zero-shot)"
    assert metric_label(recs, "caption.CIDEr") == "caption.CIDEr"


@pytest.fixture(scope="module")
def tuned_run(tiny_overrides, tmp_path_factory):
    """A frozen-LLM method (the baseline) through a run whose VQA fine-tunes, on the tiny world."""
    from vlp_bench.experiment import load_config, prepare
    from vlp_bench.log import set_progress

    cfg = load_config(None, [*tiny_overrides, "tasks.vqa.finetune_steps=3", "train.steps=2", "train.eval_every=2",
                             "train.eval_images=2", "train.val_loss_images=0", "data.workers=0",
                             "experiment.tasks=['vqa']", "train.keep_weights=false"])  # captioning's metrics start Java: seconds
    experiment = prepare(cfg)
    out = tmp_path_factory.mktemp("tuned") / "baseline-seed0"
    set_progress(False)
    try:
        experiment.run_one("baseline", 0, out)
    finally:
        set_progress(True)
    return experiment, out


def test_a_frozen_llm_method_is_fine_tuned_for_vqa_and_the_cost_is_recorded_apart(tuned_run):
    from vlp_bench.files import read_jsonl

    out = tuned_run[1]
    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "finished", res.get("traceback")
    assert res["schema_version"] >= 5 and res["metrics"]["vqa"]["protocol"] == "fine-tuned (3 steps)"
    tuned = res["cost"]["task_finetune"]["vqa"]
    assert tuned["steps"] == 3 and tuned["samples_seen"] == 3 * 8 and tuned["train_flops"] > 0
    assert "decoder_finetune" not in res["cost"] and res["cost"]["steps"] == 2  # pre-training's own cost
    assert "weights" not in res and not list(out.glob("*.safetensors"))  # train.keep_weights off: nothing kept
    curve = [r for r in read_jsonl(out / "metrics.jsonl") if r.get("split") == "val"]
    assert [r["step"] for r in curve] == [0, 2]
    assert all(r["task_finetune"]["vqa"]["steps"] == 3 and r["eval"]["vqa"]["protocol"] == "fine-tuned (3 steps)"
               for r in curve)


def test_vqa_fine_tuning_batches_ask_each_question_and_answer_it(tuned_run):
    experiment, _ = tuned_run
    vqa = experiment.tasks["vqa"]
    batch, again = next(vqa.finetune_batches(8, seed=3)), next(vqa.finetune_batches(8, seed=3))
    assert batch["question_ids"] == again["question_ids"]  # seeded: the same batches every phase
    split = vqa.train_questions
    assert len(batch["prompt"]) == len(batch["captions"]) == batch["images"].shape[0] == 8
    for q, prompt, answer, image in zip(batch["question_ids"], batch["prompt"], batch["captions"], batch["image_ids"]):
        assert prompt == vqa.cfg.prompt.format(split.questions[q]["question"]) and image == split.questions[q]["image_id"]
        assert answer == split.refs[q][0]  # its multiple_choice_answer, the floor's answer too


def test_a_seeded_phase_trains_the_same_whatever_the_random_state_it_starts_in():
    """A phase seeded from the run's seed (Experiment.phases) repeats exactly when a finished run is
    evaluated again from its kept weights, though training left the RNG elsewhere than the rebuild
    does; forked unseeded, its dropout would differ (the baseline's bridge has dropout 0.1)."""
    cfg = TrainConfig(steps=3, batch_size=4, warmup_steps=0, log_every=1, eval_every=0, warmup_exclude=0)
    method = small_baseline()
    stage = method.stages(3)[-1]

    def tuned(global_seed: int, seed: int | None) -> dict:
        torch.manual_seed(global_seed)  # where training (or the rebuild) left the random state
        with finetune(method, stage, lambda: question_batches(), cfg, CPU, seed):
            return weights(method)

    same = tuned(1, seed=7), tuned(2, seed=7)
    assert all(torch.equal(same[0][n], same[1][n]) for n in same[0])
    forked = tuned(1, seed=None), tuned(2, seed=None)
    assert not all(torch.equal(forked[0][n], forked[1][n]) for n in forked[0])
