"""The project's lmms-eval tasks: one YAML template per task in `templates/`, rendered for a data source.

lmms-eval reads task YAMLs from a folder (`include_path`) and has no variable interpolation, so the data
source is chosen when the folder is written: `write_task_dir(out_dir, source, mini_root)` copies every
template and, for the mini suite, points each dataset at its `save_to_disk` folder. The templates hold the
hub source (lmms-eval 0.7.3's own `dataset_path` / `dataset_name`), so `source="hub"` only adds provenance.

The one switch: `source` ("mini" | "hub"), defaulting to the environment variable STGC_EVAL_SOURCE, then
"mini"; `mini_root` defaults to STGC_MINI_ROOT, then `data/mini`, resolved against the current directory
when the folder is written.

Task names carry the `stgc_` prefix because lmms-eval ignores a local task whose name equals a built-in one.
Every scoring and prompt function is lmms-eval's own, referenced by module path; `utils.py` adds only the
POPE category filter and MoE-LLaVA's answer parsing (which then calls lmms-eval's scoring).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from stgc.data import params as _params

TEMPLATE_DIR = Path(__file__).parent / "templates"
SOURCES = ("mini", "hub")
ENV_SOURCE = "STGC_EVAL_SOURCE"
ENV_MINI_ROOT = "STGC_MINI_ROOT"
DEFAULT_MINI_ROOT = "data/mini"
MANIFEST_NAME = "stgc_tasks.json"

# Protocol labels used in tables: "lmms-eval" = lmms-eval 0.7.3's task as is; "moe-llava" = the parsing /
# prompt of MoE-LLaVA's own evaluation scripts where they differ (docs/benchmarks.md).
LMMS_EVAL = "lmms-eval"
MOE_LLAVA = "moe-llava"


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What the tables need to know about a task (or group) besides its YAML.

    benchmark: the mini-suite folder / benchmark name the task reads.
    builtin: the lmms-eval task it mirrors (or, for a group, what it corresponds to).
    protocol: LMMS_EVAL or MOE_LLAVA; `note` says what differs.
    headline: the metric a table reports for it (lmms-eval's key, without the ",none" filter suffix).
    subtasks: the tasks of a group (empty for a task).
    """

    name: str
    benchmark: str
    builtin: str
    protocol: str
    headline: str
    note: str
    subtasks: tuple[str, ...] = ()


def _pope(protocol: str, note: str) -> list[TaskInfo]:
    prefix = "stgc_pope" if protocol == LMMS_EVAL else "stgc_pope_moellava"
    cats = {"adv": "pope_adv", "pop": "pope_pop", "random": "pope_random"}
    out = [TaskInfo(f"{prefix}_{c}", "pope", b, protocol, "pope_f1_score", note) for c, b in cats.items()]
    subtasks = tuple(t.name for t in out)
    group_note = f"{note}; unweighted mean over the 3 categories"
    out.append(TaskInfo(prefix, "pope", "pope_full", protocol, "pope_f1_score", group_note, subtasks))
    return out


# fmt: off
_ALL = [
    TaskInfo("stgc_vqav2_val", "vqav2", "vqav2_val", LMMS_EVAL, "exact_match", "VQA soft accuracy"),
    TaskInfo("stgc_gqa", "gqa", "gqa", LMMS_EVAL, "exact_match", "exact match"),
    TaskInfo("stgc_vizwiz_vqa_val", "vizwiz", "vizwiz_vqa_val", LMMS_EVAL, "exact_match",
             "VQA soft accuracy"),
    TaskInfo("stgc_scienceqa_img", "scienceqa_img", "scienceqa_img", LMMS_EVAL, "exact_match",
             "letter or '<letter>.' counts"),
    TaskInfo("stgc_scienceqa_img_moellava", "scienceqa_img", "scienceqa_img", MOE_LLAVA, "exact_match",
             "also 'The answer is X.' (LLaVA parsing)"),
    TaskInfo("stgc_textvqa_val", "textvqa", "textvqa_val", LMMS_EVAL, "exact_match",
             "no OCR tokens in prompt"),
    TaskInfo("stgc_textvqa_val_ocr", "textvqa", "textvqa_val", MOE_LLAVA, "exact_match",
             "reference OCR tokens in prompt"),
    TaskInfo("stgc_chartqa", "chartqa", "chartqa", LMMS_EVAL, "relaxed_overall", "relaxed accuracy (5%)"),
    TaskInfo("stgc_docvqa_val", "docvqa", "docvqa_val", LMMS_EVAL, "anls", "ANLS"),
    *_pope(LMMS_EVAL, "strict yes/no parsing"),
    *_pope(MOE_LLAVA, "lenient parsing ('Yes.' counts)"),
    TaskInfo("stgc_mme", "mme", "mme", LMMS_EVAL, "mme_perception_score", "perception score"),
    TaskInfo("stgc_mmbench_en_dev_static", "mmbench", "mmbench_en_dev_static", LMMS_EVAL, "gpt_eval_score",
             "circular accuracy x100, rule-based extraction"),
    TaskInfo("stgc_mmbench_en_dev_moellava", "mmbench", "mmbench_en_dev_static", MOE_LLAVA, "gpt_eval_score",
             "MoE-LLaVA's prompt (hint/question/A-D lines), circular accuracy x100, rule-based extraction"),
]
TASKS: dict[str, TaskInfo] = {t.name: t for t in _ALL}
PROTOCOLS: dict[str, str] = {name: t.protocol for name, t in TASKS.items()}
HEADLINE: dict[str, str] = {name: t.headline for name, t in TASKS.items()}

# One task per benchmark, for the two protocols. `moe-llava` is what the MoE-LLaVA paper's numbers follow;
# where MoE-LLaVA does not differ from lmms-eval the lmms-eval task is used in both.
SUITES: dict[str, tuple[str, ...]] = {
    LMMS_EVAL: (
        "stgc_vqav2_val", "stgc_gqa", "stgc_vizwiz_vqa_val", "stgc_scienceqa_img", "stgc_textvqa_val",
        "stgc_chartqa", "stgc_docvqa_val", "stgc_pope", "stgc_mme", "stgc_mmbench_en_dev_static",
    ),
    MOE_LLAVA: (
        "stgc_vqav2_val", "stgc_gqa", "stgc_vizwiz_vqa_val", "stgc_scienceqa_img_moellava",
        "stgc_textvqa_val_ocr", "stgc_chartqa", "stgc_docvqa_val", "stgc_pope_moellava", "stgc_mme",
        "stgc_mmbench_en_dev_moellava",
    ),
}
# fmt: on

# Hub dataset (lmms-eval 0.7.3's dataset_path) -> mini-suite folder under mini_root.
MINI_FOLDERS: dict[str, str] = {
    "lmms-lab-encoder/VQAv2": "vqav2",
    "lmms-lab-encoder/GQA": "gqa",
    "lmms-lab-encoder/VizWiz-VQA": "vizwiz",
    "lmms-lab-encoder/ScienceQA": "scienceqa_img",
    "lmms-lab-encoder/textvqa": "textvqa",
    "lmms-lab-encoder/ChartQA": "chartqa",
    "lmms-lab-encoder/DocVQA": "docvqa",
    "lmms-lab-encoder/POPE": "pope",
    "lmms-lab-encoder/MME": "mme",
    "lmms-lab-encoder/MMBench": "mmbench",
}
# Mini-suite folder -> the split its lmms-eval task reads (the real dataset's split name), and POPE's
# negative-sampling categories (the `category` column; one task per category): both defined once, by the
# mini suite's registry.
MINI_SPLITS: dict[str, str] = dict(_params.SPLITS)
POPE_CATEGORIES = _params.POPE_CATEGORIES
# Keys replaced when the mini suite is the source, per hub dataset. GQA's process_docs downloads the image
# set and joins it onto the rows; the mini rows already hold `image`.
MINI_OVERRIDES: dict[str, dict[str, Any]] = {"lmms-lab-encoder/GQA": {"process_docs": None}}


def list_tasks() -> list[str]:
    """All task and group names, sorted."""
    return sorted(TASKS)


def expand_tasks(names: list[str] | tuple[str, ...]) -> list[str]:
    """Task names in order, with suite names (`lmms-eval`, `moe-llava`) replaced by their tasks and duplicates
    dropped; unknown names raise ValueError listing the valid ones."""
    unknown = [n for n in names if n not in TASKS and n not in SUITES]
    if unknown:
        raise ValueError(
            f"unknown task(s) {', '.join(unknown)}; valid tasks: {', '.join(list_tasks())} "
            f"(or a suite: {', '.join(SUITES)})"
        )
    out = [t for n in names for t in (SUITES[n] if n in SUITES else (n,))]
    return list(dict.fromkeys(out))


def benchmarks_of(names: list[str] | tuple[str, ...]) -> list[str]:
    """The mini-suite folders that the tasks read, in first-use order."""
    return list(dict.fromkeys(TASKS[n].benchmark for n in expand_tasks(names)))


def resolve_source(source: str | None = None, mini_root: str | os.PathLike | None = None) -> tuple[str, Path]:
    """The data source and the absolute mini-suite root, from the arguments, then the environment."""
    source = source or os.environ.get(ENV_SOURCE) or "mini"
    if source not in SOURCES:
        raise ValueError(
            f"unknown evaluation source {source!r} (from argument or ${ENV_SOURCE}); use one of "
            f"{', '.join(SOURCES)}"
        )
    root = Path(mini_root or os.environ.get(ENV_MINI_ROOT) or DEFAULT_MINI_ROOT).expanduser().resolve()
    return source, root


class _FunctionRef(str):
    """A `!function module.name` scalar kept as text, so templates round-trip without importing anything."""


class _Loader(yaml.SafeLoader):
    pass


class _Dumper(yaml.SafeDumper):
    pass


_Loader.add_constructor("!function", lambda loader, node: _FunctionRef(loader.construct_scalar(node)))
_Dumper.add_representer(_FunctionRef, lambda dumper, ref: dumper.represent_scalar("!function", str(ref)))


def load_template(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.load(f, Loader=_Loader)


def render_config(config: dict[str, Any], source: str, mini_root: Path) -> dict[str, Any]:
    """One template rendered for `source`: the mini suite swaps the hub dataset for its folder."""
    out = dict(config)
    if source == "mini" and "dataset_path" in out:
        hub = out["dataset_path"]
        if hub not in MINI_FOLDERS:
            raise AssertionError(f"template dataset {hub!r} has no mini folder in MINI_FOLDERS")
        out["dataset_path"] = str(mini_root / MINI_FOLDERS[hub])
        out["dataset_kwargs"] = {"load_from_disk": True}
        out.pop("dataset_name", None)
        out.update(MINI_OVERRIDES.get(hub, {}))
    if "task" in out or "group" in out:
        metadata = dict(out.get("metadata") or {})
        # lmms-eval merges an `include` shallowly, so a task that includes another needs its own metadata.
        assert "version" in metadata, (
            f"template of {out.get('task') or out.get('group')} has no metadata.version"
        )
        metadata["source"] = source
        out["metadata"] = metadata
    return out


def _write_atomic(path: Path, text: str) -> None:
    # Every rank of an `accelerate launch` may write the same folder: never expose a half-written file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_task_dir(
    out_dir: str | os.PathLike, source: str | None = None, mini_root: str | os.PathLike | None = None
) -> Path:
    """Render every task template into `out_dir` (created) for `source`; pass the folder to lmms-eval as
    `include_path` (`TaskManager(include_path=...)` or `--include_path`). Also writes `stgc_tasks.json`
    (source, mini_root) next to the YAMLs. Returns the folder."""
    source, root = resolve_source(source, mini_root)
    if source == "mini":
        from stgc.data.suite import check_generated_suite

        check_generated_suite(root)  # a suite of another generator version: refused, with the fix
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for template in sorted(TEMPLATE_DIR.glob("*.yaml")):
        rendered = render_config(load_template(template), source, root)
        header = f"# Rendered from evals/tasks/templates/{template.name} for source={source}; do not edit.\n"
        _write_atomic(out / template.name, header + yaml.dump(rendered, Dumper=_Dumper, sort_keys=False))
    manifest = {"source": source, "mini_root": str(root) if source == "mini" else None}
    _write_atomic(out / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return out
