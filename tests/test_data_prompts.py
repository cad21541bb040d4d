"""The training prompts equal what lmms-eval 0.7.3's own doc_to_text builds from the generated rows (with
each task's default kwargs read from its installed YAML); its doc_to_visual / doc_to_target accept them."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from datasets import Dataset

from stgc.data.generate import eval_rows
from stgc.data.prompts import doc_to_target, doc_to_text
from stgc.data.registry import BENCHMARKS

lmms_tasks = pytest.importorskip("lmms_eval.tasks")
TASKS = Path(lmms_tasks.__file__).parent

# benchmark -> (utils module, doc_to_text, doc_to_visual, YAML files whose kwargs apply, later ones win)
LMMS = {
    "vqav2": ("vqav2.utils", "vqav2_doc_to_text", "vqav2_doc_to_visual",
              ["vqav2/_default_template_vqav2_yaml", "vqav2/vqav2_val.yaml"]),
    "gqa": ("gqa.utils", "gqa_doc_to_text", "gqa_doc_to_visual", ["gqa/gqa.yaml"]),
    "vizwiz": ("vizwiz_vqa.utils", "vizwiz_vqa_doc_to_text", "vizwiz_vqa_doc_to_visual",
               ["vizwiz_vqa/_default_template_vqa_yaml", "vizwiz_vqa/vizwiz_vqa_val.yaml"]),
    "scienceqa_img": ("scienceqa.utils", "sqa_doc_to_text", "sqa_doc_to_visual",
                      ["scienceqa/scienceqa_img.yaml"]),
    "textvqa": ("textvqa.utils", "textvqa_doc_to_text", "textvqa_doc_to_visual",
                ["textvqa/_default_template_textvqa_yaml", "textvqa/textvqa_val.yaml"]),
    "chartqa": ("chartqa.utils", "chartqa_doc_to_text", "chartqa_doc_to_visual", ["chartqa/chartqa.yaml"]),
    "docvqa": ("docvqa.utils", "docvqa_doc_to_text", "docvqa_doc_to_visual",
               ["docvqa/_default_template_docvqa_yaml", "docvqa/docvqa_val.yaml"]),
    "pope": ("pope.utils", "pope_doc_to_text", "pope_doc_to_visual", ["pope/pope.yaml"]),
    "mme": ("mme.utils", "mme_doc_to_text", "mme_doc_to_visual", ["mme/mme.yaml"]),
    "mmbench": ("mmbench.en_utils", "mmbench_doc_to_text", "mmbench_doc_to_visual",
                ["mmbench/_default_template_mmbench_en_yaml", "mmbench/mmbench_en_dev_static.yaml"]),
}  # fmt: skip


def _yaml(path: Path) -> dict:
    # lmms-eval YAMLs use a custom !function tag; drop those lines (as lmms-eval's mmbench utils do)
    text = "".join(line for line in path.read_text().splitlines(keepends=True) if "!function" not in line)
    return yaml.safe_load(text) or {}


def _default_kwargs(files: list[str]) -> dict:
    kwargs: dict = {}
    for f in files:
        kwargs.update((_yaml(TASKS / f).get("lmms_eval_specific_kwargs") or {}).get("default", {}))
    return kwargs


def _saved_rows(name: str, docs: int = 12) -> list[dict]:
    """Rows as lmms-eval receives them from a saved suite (through Arrow, images decoded as PIL)."""
    rows, _ = eval_rows(name, docs, 5, 64)
    return list(Dataset.from_list(rows, features=BENCHMARKS[name].features))


def test_task_names_and_splits_match_the_installed_yaml() -> None:
    for name, spec in BENCHMARKS.items():
        files = [TASKS / f for f in LMMS[name][3]]
        merged: dict = {}
        for f in files:
            merged.update(_yaml(f))
        assert merged["task"] == spec.lmms_task, name
        assert merged["test_split"] == spec.split, name


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_prompt_equals_lmms_eval_doc_to_text(name: str) -> None:
    module, text_fn, visual_fn, files = LMMS[name]
    utils = importlib.import_module(f"lmms_eval.tasks.{module}")
    kwargs = _default_kwargs(files)
    for row in _saved_rows(name):
        assert doc_to_text(name, row) == getattr(utils, text_fn)(dict(row), kwargs)
        visual = getattr(utils, visual_fn)(dict(row))
        assert len(visual) == 1 and visual[0].mode == "RGB"
    if name == "textvqa":  # the LLaVA / MoE-LLaVA protocol with OCR tokens
        for row in _saved_rows(name):
            assert doc_to_text(name, row, ocr=True) == getattr(utils, text_fn)(
                dict(row), {**kwargs, "ocr": True}
            )


def test_targets_match_lmms_eval_doc_to_target() -> None:
    from lmms_eval.tasks.scienceqa.utils import sqa_doc_to_target

    for row in _saved_rows("scienceqa_img"):
        assert doc_to_target("scienceqa_img", row) == sqa_doc_to_target(row)
    for name in ("gqa", "chartqa", "pope", "mme", "mmbench"):  # doc_to_target: "answer"
        for row in _saved_rows(name):
            assert doc_to_target(name, row) == row["answer"]
    for row in _saved_rows("docvqa"):  # doc_to_target: "answers"; the first is the training target
        assert doc_to_target("docvqa", row) in row["answers"]
