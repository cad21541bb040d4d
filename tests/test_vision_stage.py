"""Stage 0 (stgc.vision_stage): the tiny tower pretrained per patch, saved as a CLIP vision folder, reused
when finished, and loaded into a model built from scratch through model.vision_init."""

import json

import numpy as np
import pytest
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel

from stgc.recipes import ModelConfig, get_recipe
from stgc.vision_stage import STAGE_FILE, VisionStage, load_vision_tower, pretrain_vision, scene_batch

QUICK = VisionStage(steps=2, batch_size=4, image_size=64, val_scenes=4)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    from stgc.data.suite import generate_suite

    out = tmp_path_factory.mktemp("data") / "mini"
    generate_suite(out, docs=1, train_size=8, image_size=64, vocab_size=400, benchmarks=["pope"])
    return out


def test_scene_batch_labels_the_patch_of_each_object_centre() -> None:
    images, labels = scene_batch(np.random.default_rng(0), 6, cells=3, image_size=96, grids=(3,))
    assert len(images) == 6 and images[0].size == (96, 96)
    assert labels["shape"].shape == labels["color"].shape == (6, 9)
    # a patch holds an object exactly when it has both a shape and a colour; 1-6 objects per scene
    assert torch.equal(labels["shape"] > 0, labels["color"] > 0)
    per_scene = (labels["shape"] > 0).sum(1)
    assert int(per_scene.min()) >= 1 and int(per_scene.max()) <= 6


def test_pretrain_saves_a_clip_tower_with_its_accuracies_and_reuses_it(tmp_path) -> None:
    out = pretrain_vision("tiny", tmp_path / "vision-tiny", QUICK)
    record = json.loads((out / STAGE_FILE).read_text())
    assert record["size"] == "tiny" and record["steps"] == 2
    assert 0.0 <= record["shape_accuracy"] <= 1.0 and 0.0 <= record["color_accuracy"] <= 1.0
    tower = CLIPVisionModel.from_pretrained(out)
    assert tower.config.image_size == 48 and tower.config.patch_size == 16
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert pretrain_vision("tiny", out, QUICK) == out  # finished: not trained again
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="other settings"):
        pretrain_vision("tiny", out, VisionStage(steps=3, batch_size=4, image_size=64, val_scenes=4))


def test_dense_run_starts_from_the_pretrained_tower(tmp_path, suite) -> None:
    from stgc.train import build_components

    folder = pretrain_vision("tiny", tmp_path / "tower", QUICK)
    config = get_recipe("tiny_dense")
    config = config.replace(
        model=config.model.replace(vision_init=str(folder)),
        data=config.data.replace(train=str(suite / "train"), tokenizer=str(suite / "tokenizer")),
        output_dir=str(tmp_path / "runs" / "tiny_dense"),
    )
    model = build_components(config).model
    saved = CLIPVisionModel.from_pretrained(folder).state_dict()
    for key, value in model.model.vision_tower.state_dict().items():
        assert torch.equal(value, saved[key]), key


def test_a_tower_of_another_shape_is_refused(tmp_path) -> None:
    from transformers import LlavaForConditionalGeneration

    from stgc.modeling import build_llava_config

    other = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        )
    )
    other.save_pretrained(tmp_path / "other")
    model = LlavaForConditionalGeneration(
        build_llava_config("llama", "tiny", vocab_size=64, image_token_id=3, pad_token_id=0)
    )
    with pytest.raises(ValueError, match="another shape.*image_size"):
        load_vision_tower(model, tmp_path / "other")


def test_vision_init_is_checked(tmp_path, suite) -> None:
    from stgc.train import build_components

    # a folder is checked where it is used, as model.init is (a saved config loads on any machine) ...
    config = get_recipe("tiny_dense")
    config = config.replace(
        model=config.model.replace(vision_init=str(tmp_path / "nowhere")),
        data=config.data.replace(train=str(suite / "train"), tokenizer=str(suite / "tokenizer")),
        output_dir=str(tmp_path / "runs" / "tiny_dense"),
    )
    with pytest.raises(
        ValueError, match="model.vision_init='.*nowhere' is neither scratch nor patch_pretrain"
    ):
        build_components(config)
    # ... what no folder can fix, when the config is built
    with pytest.raises(ValueError, match="model.vision_init='' is invalid"):
        ModelConfig(vision_init="")
    with pytest.raises(ValueError, match="applies to a model built from scratch"):
        ModelConfig(init="recipe:tiny_dense", vision_init="patch_pretrain")
    assert get_recipe("tiny_dense").model.vision_init == "patch_pretrain"
    assert "vision" not in get_recipe("tiny_dense").training.trainable_groups()  # frozen, as MoE-LLaVA's CLIP


def test_a_dense_run_pretrains_the_tower_once_and_keeps_it_frozen(tmp_path, suite, monkeypatch) -> None:
    """model.vision_init=patch_pretrain: stage 0 runs into <runs>/vision-tiny before the dense run (here with
    the quick settings), and the dense run trains everything but the tower."""
    import stgc.train
    from stgc.overrides import apply_overrides

    monkeypatch.setattr(stgc.train, "pretrain_vision", lambda size, out: pretrain_vision(size, out, QUICK))
    config = apply_overrides(
        get_recipe("tiny_dense"),
        [
            f"data.train={suite / 'train'}",
            f"data.tokenizer={suite / 'tokenizer'}",
            "training.max_steps=1",
            "training.batch_size=2",
            f"output_dir={tmp_path / 'runs' / 'tiny_dense'}",
        ],
    )
    final = stgc.train.train(config)
    tower = tmp_path / "runs" / "vision-tiny"
    assert json.loads((tower / STAGE_FILE).read_text())["steps"] == QUICK.steps
    from transformers import AutoModelForImageTextToText

    trained = AutoModelForImageTextToText.from_pretrained(final).model.vision_tower.state_dict()
    for key, value in CLIPVisionModel.from_pretrained(tower).state_dict().items():
        assert torch.equal(value, trained[key]), key
