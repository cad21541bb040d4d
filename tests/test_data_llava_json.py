"""LLaVA-mix-665K as distributed (`stgc.data.llava_json`) on a generated replica: row checks with one clear
line per malformed row, `<image>` moved to the front, text-only and multi-turn rows collated with labels on
the assistant turns only, LLaVA's modality-grouped sampler, and a tiny run that trains on the replica end to
end and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from stgc.data.llava_json import JSON_NAME, load_llava_json, move_image_to_front, write_replica
from stgc.data.sampling import modality_grouped_indices


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Path:
    return write_replica(tmp_path_factory.mktemp("llava") / "replica", rows=24, seed=0)


@pytest.fixture(scope="module")
def tokenizer_dir(replica, tmp_path_factory) -> Path:
    from stgc.data.tokenizer import train_tokenizer

    rows = json.loads(replica.read_text())
    texts = [t["value"] for r in rows for t in r["conversations"]] * 4
    texts.append("A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:")
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(texts, vocab_size=400).save_pretrained(out)
    return out


def test_replica_layout_and_rows(replica):
    rows = json.loads(replica.read_text())
    assert replica.name == JSON_NAME
    dirs = {str(Path(r["image"]).parent) for r in rows if "image" in r}
    assert dirs == {"coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K"}
    data = load_llava_json(replica)
    text_only = [i for i, r in enumerate(rows) if "image" not in r]
    assert text_only and len(data) == len(rows)
    lengths = data.modality_lengths
    assert all((lengths[i] < 0) == (i in text_only) for i in range(len(rows)))
    item = data[1]  # its <image> follows the question in the file, as in parts of 665K
    assert rows[1]["conversations"][0]["value"].endswith("\n<image>")
    assert item["conversations"][0]["value"].startswith("<image>\nWhat color")
    assert item["image"].mode == "RGB" and item["image"].size[0] != item["image"].size[1]
    assert data[text_only[0]]["image"] is None and len(data[text_only[0]]["conversations"]) == 4


def test_move_image_to_front_is_llavas():
    turns = [{"from": "human", "value": "  What is it?\n<image> "}, {"from": "gpt", "value": "a cat"}]
    assert move_image_to_front(turns) == [
        {"from": "human", "value": "<image>\nWhat is it?"},
        {"from": "gpt", "value": "a cat"},
    ]


def test_collated_batch_labels_only_assistant_turns(replica, tokenizer_dir):
    from transformers import AutoTokenizer

    from stgc.data.chat_templates import apply_template
    from stgc.data.collate import IGNORE_INDEX, LlavaCollator
    from stgc.modeling import build_processor

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    apply_template(tok, "moellava_stablelm")
    processor = build_processor(tok, 32, 8, pad_to_square=True)
    data = load_llava_json(replica)
    rows = [data[0], data[5]]  # a two-turn image row, a two-turn text-only row
    batch = LlavaCollator(processor)(rows)
    assert batch["pixel_values"].shape == (1, 3, 32, 32)  # only the image row's image
    for b, row in enumerate(rows):
        labels = batch["labels"][b]
        kept = tok.decode(labels[labels != IGNORE_INDEX])
        answers = [t["value"] for t in row["conversations"] if t["from"] == "gpt"]
        assert kept.replace(" ", "") == "".join(f"{a}{tok.eos_token}" for a in answers).replace(" ", "")
    text_only = LlavaCollator(processor)([data[5], data[11]])
    assert "pixel_values" not in text_only and (text_only["labels"] != IGNORE_INDEX).any()


BAD_ROWS = {
    "missing image file": (
        lambda r: r[0].update(image="coco/train2017/nope.jpg"),
        "row 0 (id '000000000'): image file 'coco/train2017/nope.jpg' is missing",
    ),
    "unknown role": (
        lambda r: r[2]["conversations"][1].update({"from": "bot"}),
        "row 2 (id '000000002'): conversations[1].from is 'bot'; a turn is from 'human' or 'gpt'",
    ),
    "empty turn": (
        lambda r: r[3]["conversations"][1].update(value="  "),
        "row 3 (id '000000003'): conversations[1].value is empty",
    ),
    "turns out of order": (
        lambda r: r[4]["conversations"].reverse(),
        "row 4 (id '000000004'): conversations[0].from is 'gpt' where 'human' is due",
    ),
    "placeholder without image": (
        lambda r: r[5]["conversations"][0].update(value="<image>\nWhat is 1 plus 2?"),
        "row 5 (id 'text_0005'): conversations hold <image> but the row has no image",
    ),
    "image path escaping the folder": (
        lambda r: r[6].update(image="../../etc/passwd"),
        "row 6 (id '000000006'): image '../../etc/passwd' points outside the image folder",
    ),
    "absolute image path": (
        lambda r: r[7].update(image="/etc/passwd"),
        "row 7 (id '000000007'): image '/etc/passwd' points outside the image folder",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_malformed_rows_are_one_line_and_exit_2(case, replica, tokenizer_dir, tmp_path, capsys):
    """Through `stgc train`: the row, the field and the fix on one line, exit status 2, nothing written."""
    from stgc.cli import main

    mutate, expected = BAD_ROWS[case]
    rows = json.loads(replica.read_text())
    mutate(rows)
    bad = replica.parent / f"bad_{case.replace(' ', '_')}.json"
    bad.write_text(json.dumps(rows))
    out = tmp_path / "run"
    rc = main(["train", "tiny", f"data.train={bad}", f"data.tokenizer={tokenizer_dir}", "model.init=scratch",
               f"output_dir={out}"])  # fmt: skip
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0] and str(bad) in lines[0]
    assert not any(out.glob("checkpoint-*"))


def test_modality_grouped_order():
    lengths = [5, 9, -3, 7, -8, 2, 4, -6, 11, 3, 6, 8]  # 9 image rows, 3 text-only rows
    g = torch.Generator().manual_seed(0)
    order = modality_grouped_indices(lengths, 2, g)
    assert sorted(order) == list(range(len(lengths)))
    full = len(order) - 2  # one image and one text-only row are left over, mixed, at the end
    for s in range(0, full, 2):
        block = [lengths[i] > 0 for i in order[s : s + 2]]
        assert len(set(block)) == 1, order
    assert {lengths[i] > 0 for i in order[full:]} == {True, False}
    assert order == modality_grouped_indices(lengths, 2, torch.Generator().manual_seed(0))
    only_images = modality_grouped_indices([3, 1, 2, 5], 2, torch.Generator().manual_seed(1))
    assert sorted(only_images) == [0, 1, 2, 3]


def test_tiny_run_trains_on_the_replica_and_resumes(replica, tokenizer_dir, tmp_path):
    """One epoch (6 steps of 4 rows, text-only batches included, grouped by modality, MoE-LLaVA's chat
    template, images padded to squares), interrupted after step 3 and resumed: the same weights as the
    uninterrupted run; the checkpoint's processor carries the template and the padding."""
    from transformers import AutoProcessor

    from stgc.callbacks import StopAtStepCallback
    from stgc.data.chat_templates import get_template
    from stgc.recipes import apply_overrides, get_recipe
    from stgc.train import build_components, train

    batches: list[dict] = []

    def recorded(config):
        parts = build_components(config)
        collate = parts.data_collator
        parts.data_collator = lambda rows: (batches.append(batch := collate(rows)), batch)[1]
        return parts

    def config(name):
        return apply_overrides(
            get_recipe("tiny"),
            [
                f"data.train={replica}", f"data.tokenizer={tokenizer_dir}", "data.chat_template=moellava_phi",
                "data.image_aspect_ratio=pad", "data.group_by_modality_length=true", "model.init=scratch",
                "training.trainable=all", "training.batch_size=4", "training.max_steps=6",
                "training.save_steps=3", "training.measure_conflict_every=0", "training.lr=1e-3",
                f"output_dir={tmp_path / name}",
            ],
        )  # fmt: skip

    full = train(config("full"), components=recorded)
    assert full.name == "checkpoint-6"
    images = [len(b["pixel_values"]) if "pixel_values" in b else 0 for b in batches]
    # 20 image rows and 4 text-only ones: five batches of images, one of text (trained too), none mixed
    assert sorted(images) == [0, 4, 4, 4, 4, 4]
    partial = train(config("cut"), components=recorded, callbacks=[StopAtStepCallback(3)])
    assert partial.name == "checkpoint-3"
    resumed = train(config("cut"), components=recorded)
    assert resumed.name == "checkpoint-6"
    from safetensors.torch import load_file

    a, b = load_file(full / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    processor = AutoProcessor.from_pretrained(resumed)
    assert processor.image_processor.do_pad
    assert processor.tokenizer.chat_template == get_template("moellava_phi").jinja()


def test_stgc_data_writes_the_replica(tmp_path, capsys):
    from stgc.cli import main

    assert main(["data", "--llava-replica", str(tmp_path / "r"), "--replica-rows", "7"]) == 0
    assert len(load_llava_json(tmp_path / "r" / JSON_NAME)) == 7
    assert "LLaVA-mix-665K replica" in capsys.readouterr().out
