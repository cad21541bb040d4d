"""Stage L (stgc.lm_stage): questions that agree with their symbolic scenes, sequences laid out exactly as
the training collator lays out a LLaVA conversation, phases that stop at their goal, and the way into a
LLaVA (model.text_init, model.projector_init) with its checks."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel, LlavaForConditionalGeneration

from stgc.backbones import vision_config
from stgc.data.collate import LlavaCollator
from stgc.data.render import COLOR_NAMES, SHAPES
from stgc.lm_stage import (
    STAGE_FILE,
    TASKS,
    LMStage,
    Phase,
    _Questions,
    _SlotLM,
    align_projector,
    load_language_model,
    patch_features,
    pretrain_language_model,
)
from stgc.modeling import build_llava_config, build_processor
from stgc.recipes import ModelConfig, get_recipe

QUICK = LMStage(
    phases=(
        Phase({"lookup": 1.0}, 300, goal="lookup", target=0.0),  # met at the first check (step 100)
        Phase(
            {"pope": 1.0}, 30, goal="pope", target=1.01
        ),  # never met: runs to max_steps, checked at the end
        Phase({t: 1.0 for t in TASKS}, 4),
    ),
    batch_size=4,
    val_items=2,
    warmup=2,
)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    from stgc.data.suite import generate_suite

    out = tmp_path_factory.mktemp("data") / "mini"
    benchmarks = ["pope", "mmbench", "vqav2", "scienceqa_img"]
    generate_suite(out, docs=1, train_size=40, image_size=64, vocab_size=1000, benchmarks=benchmarks)
    return out


@pytest.fixture(scope="module")
def language_model(tmp_path_factory, suite):
    return pretrain_language_model(
        "tiny", suite / "tokenizer", tmp_path_factory.mktemp("lm") / "tiny-lm", QUICK
    )


def _llava(tok, **text):
    ids = dict(image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)
    return LlavaForConditionalGeneration(
        build_llava_config("llama", "tiny", vocab_size=len(tok), **ids, **text)
    )


def _objects(grid):
    return [(SHAPES[s], COLOR_NAMES[c]) for s, c in grid if s >= 0]


def test_answers_agree_with_the_scene() -> None:
    q = _Questions(np.random.default_rng(0))
    for _ in range(50):
        (item,) = q.pope()
        asked = item.prompt.split("Is there a ")[1].split(" in the image?")[0]
        assert item.answer == ("yes" if asked in [s for s, _ in _objects(item.grid)] else "no")
        (item,) = q.color()
        asked = item.prompt.split("What color is the ")[1].split("?")[0]
        assert item.answer == dict(_objects(item.grid))[asked]
        rotations = q.mmbench(rotations=True)
        assert len(rotations) == 4 and len({r.answer for r in rotations}) == 4  # the gold moves
        for item in rotations:
            asked = item.prompt.split("What color is the ")[1].split("?")[0]
            assert f"\n{item.answer}. {dict(_objects(item.grid))[asked]}" in item.prompt
        (item,) = q.scienceqa()
        color = item.prompt.split("the ")[1].split(" object")[0]
        shape = {c: s for s, c in _objects(item.grid)}[color]
        assert f"\n{item.answer}. the {shape}" in item.prompt
        for item in (*q.lookup(), *q.lookup_plain()):
            asked = item.prompt.split("Which option is ")[1].split("?")[0]
            assert f"\n{item.answer}. {asked}\n" in item.prompt


def test_sequences_match_the_training_collator(suite) -> None:
    """Image positions, prompt and answer tokens as `stgc train` builds them from the same conversation."""
    tok = AutoTokenizer.from_pretrained(suite / "tokenizer")
    slot_lm = _SlotLM(None, tok)
    items = [i for task in TASKS for i in getattr(_Questions(np.random.default_rng(1)), task)()]
    batch = slot_lm.batch(items)
    vision = vision_config("tiny")
    collator = LlavaCollator(build_processor(tok, vision.image_size, vision.patch_size))
    from PIL import Image

    for b, item in enumerate(items):
        human = "<image>" + item.prompt.removesuffix(" ASSISTANT:")
        row = {"image": Image.new("RGB", (64, 64)), "conversations": [
            {"from": "human", "value": human}, {"from": "gpt", "value": item.answer}]}  # fmt: skip
        want = collator([row])
        n = int(want["attention_mask"].sum())
        ids = batch["ids"][b, :n].clone()
        ids[batch["slots"][b, :n]] = collator.image_token_id
        assert torch.equal(ids, want["input_ids"][0]), item
        assert torch.equal(batch["labels"][b, :n], want["labels"][0])
        assert int(batch["slots"][b].sum()) == 9


def test_pretrain_writes_a_language_model_and_stops_a_phase_at_its_goal(language_model) -> None:
    record = json.loads((language_model / STAGE_FILE).read_text())
    assert record["phases_run"] == [
        {"phase": 1, "steps": 100, "goal": "lookup", "reached": True},
        {"phase": 2, "steps": 30, "goal": "pope", "reached": False},
        {"phase": 3, "steps": 4, "goal": None, "reached": None},
    ]
    assert set(record["held_out"]) == set(TASKS)
    assert "circular" in record["held_out"]["mmbench"] and "circular" not in record["held_out"]["pope"]
    lm = AutoModelForCausalLM.from_pretrained(language_model)
    assert lm.config.hidden_size == 64
    with pytest.raises(ValueError, match="unknown tasks"):
        pretrain_language_model(
            "tiny", language_model, language_model, LMStage(phases=(Phase({"vqa": 1}, 2),))
        )


def test_load_checks_tokenizer_and_shape(tmp_path, suite, language_model) -> None:

    tok = AutoTokenizer.from_pretrained(suite / "tokenizer")
    model = _llava(tok)
    load_language_model(model, language_model, tok)
    lm = AutoModelForCausalLM.from_pretrained(language_model)
    assert torch.equal(model.lm_head.weight, lm.lm_head.weight)
    assert torch.equal(model.get_input_embeddings().weight, lm.get_input_embeddings().weight)
    other = AutoTokenizer.from_pretrained(suite / "tokenizer")
    other.add_tokens(["<extra>"])
    with pytest.raises(ValueError, match="another tokenizer than the run's data.tokenizer"):
        load_language_model(model, language_model, other)
    shallow = _llava(tok, num_hidden_layers=2)
    with pytest.raises(ValueError, match="another architecture"):
        load_language_model(shallow, language_model, tok)
    other_rope = _llava(tok)
    other_rope.config.text_config.rope_parameters = {"rope_type": "default", "rope_theta": 1e6}
    with pytest.raises(ValueError, match="rope_parameters"):
        load_language_model(other_rope, language_model, tok)
    no_tokenizer = tmp_path / "lm"
    AutoModelForCausalLM.from_pretrained(language_model).save_pretrained(no_tokenizer)
    with pytest.raises(ValueError, match="no tokenizer.json"):
        load_language_model(model, no_tokenizer, tok)
    with pytest.raises(ValueError, match="neither scratch nor slot_pretrain"):
        load_language_model(model, tmp_path / "empty", tok)


def test_align_projector_fits_the_stage_l_vectors(suite, language_model) -> None:

    tok = AutoTokenizer.from_pretrained(suite / "tokenizer")
    model = _llava(tok)
    load_language_model(model, language_model, tok)
    tower = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    result = align_projector(model, tok, steps=30, batch_size=8)
    assert result["relative_error"] < 0.75 * result["relative_error_before"]  # a random tower: 1.39 -> 0.81
    assert all(torch.equal(v, model.model.vision_tower.state_dict()[k]) for k, v in tower.items())


def test_align_reads_the_features_llava_projects(suite) -> None:

    tok = AutoTokenizer.from_pretrained(suite / "tokenizer")
    model = _llava(tok).eval()
    pixels = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ours = model.model.multi_modal_projector(patch_features(model, pixels))
        theirs = model.model.get_image_features(pixel_values=pixels).pooler_output
    assert ours.shape == (2, 9, 64) and torch.allclose(
        ours, torch.stack(list(theirs)).view(ours.shape), atol=1e-6
    )


def test_train_aligns_the_projector_when_asked(tmp_path, suite, language_model, monkeypatch) -> None:
    import stgc.lm_stage
    from stgc.train import _init_language_model

    calls = []
    monkeypatch.setattr(stgc.lm_stage, "align_projector", lambda *a, **k: calls.append(k) or {})
    config = get_recipe("tiny_dense")
    model_cfg = config.model.replace(vision_init="x", text_init=str(language_model), projector_init="align")
    tok = AutoTokenizer.from_pretrained(suite / "tokenizer")

    model = _llava(tok)
    _init_language_model(config.replace(model=model_cfg), model, tok)
    assert calls == [{"seed": 0}]
    _init_language_model(config.replace(model=model_cfg.replace(projector_init="scratch")), model, tok)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="no stage-L language model ships for size 'tiny'"):
        _init_language_model(config.replace(model=model_cfg.replace(text_init="slot_pretrain")), model, tok)


def test_config_checks_and_the_dense_run(tmp_path, suite, language_model) -> None:
    with pytest.raises(ValueError, match="applies to a dense model built from scratch"):
        ModelConfig(text_init="slot_pretrain")
    with pytest.raises(ValueError, match="projector_init=align fits the projector"):
        ModelConfig(dense=True, projector_init="align")
    with pytest.raises(ValueError, match="model.projector_init='x' is invalid"):
        ModelConfig(projector_init="x")
    from stgc.train import build_components

    tower = tmp_path / "tower"
    CLIPVisionModel(vision_config("tiny")).save_pretrained(tower)
    config = get_recipe("tiny_dense")
    config = config.replace(
        model=config.model.replace(
            vision_init=str(tower), text_init=str(language_model), projector_init="scratch"
        ),
        data=config.data.replace(train=str(suite / "train"), tokenizer=str(suite / "tokenizer")),
        output_dir=str(tmp_path / "runs" / "tiny_dense"),
    )
    model = build_components(config).model
    lm = AutoModelForCausalLM.from_pretrained(language_model)
    assert torch.equal(model.lm_head.weight, lm.lm_head.weight)
