"""The task adapter: templates vs registry, the source switch, and the whole lmms-eval pipeline on fixed
predictions against lmms-eval's own scoring functions (taken from the built-in task configs)."""

from __future__ import annotations

import argparse
import copy
import statistics
import zlib
from pathlib import Path

import pytest
import yaml

from evals import tasks as T
from evals.tasks import utils as U
from evals.testing import SPLITS, scripted_model_class, write_tiny_suite


def _template_configs() -> dict[str, dict]:
    out = {}
    for path in sorted(T.TEMPLATE_DIR.glob("*.yaml")):
        cfg = T.load_template(path)
        name = cfg.get("group") or cfg.get("task")
        if name:
            out[name] = cfg
    return out


def test_registry_matches_templates():
    configs = _template_configs()
    assert sorted(configs) == T.list_tasks()
    for name, info in T.TASKS.items():
        cfg = configs[name]
        assert info.protocol in (T.LMMS_EVAL, T.MOE_LLAVA)
        assert name.startswith("stgc_")
        if info.subtasks:
            assert tuple(cfg["task"]) == info.subtasks
            assert all(T.TASKS[s].benchmark == info.benchmark for s in info.subtasks)
            assert any(m["metric"] == info.headline for m in cfg["aggregate_metric_list"])
    for suite in T.SUITES.values():
        assert len(suite) == 10 and len({T.TASKS[t].benchmark for t in suite}) == 10


@pytest.fixture(scope="module")
def builtin_manager():
    from lmms_eval.tasks import TaskManager

    return TaskManager()


def test_hub_source_equals_builtin_tasks(builtin_manager):
    """The hub rendering reads the same dataset as the lmms-eval task it mirrors."""
    from lmms_eval import utils as lmms_utils

    for name, info in T.TASKS.items():
        if info.subtasks:
            assert info.builtin in builtin_manager.all_groups or info.builtin in builtin_manager.all_tasks
            continue
        ours = T.render_config(_resolved_template(name), "hub", Path("unused"))
        if name.startswith("stgc_pope"):
            builtin = "pope"  # the category tasks filter the default POPE config (see the template)
        else:
            builtin = info.builtin
        theirs = lmms_utils.load_yaml_config(builtin_manager._get_yaml_path(builtin), mode="simple")
        for key in ("dataset_path", "dataset_name", "test_split"):
            assert ours.get(key) == theirs.get(key), (name, key)


def _resolved_template(name: str) -> dict:
    """A template with its `include` merged (as lmms-eval merges it)."""
    path = next(p for p in T.TEMPLATE_DIR.glob("*.yaml") if (T.load_template(p).get("task") == name))
    cfg = T.load_template(path)
    if "include" in cfg:
        base = T.load_template(T.TEMPLATE_DIR / cfg.pop("include"))
        base.update(cfg)
        cfg = base
    return cfg


def test_source_switch(tmp_path, monkeypatch):
    monkeypatch.delenv(T.ENV_SOURCE, raising=False)
    monkeypatch.delenv(T.ENV_MINI_ROOT, raising=False)
    monkeypatch.chdir(tmp_path)
    mini = T.write_task_dir(tmp_path / "mini_tasks")
    gqa = yaml.load((mini / "stgc_gqa.yaml").read_text(), Loader=T._Loader)
    assert gqa["dataset_path"] == str(tmp_path / "data" / "mini" / "gqa")  # relative default, resolved
    assert gqa["dataset_kwargs"] == {"load_from_disk": True} and gqa["process_docs"] is None
    assert "dataset_name" not in gqa and gqa["metadata"] == {"version": 1.0, "source": "mini"}

    monkeypatch.setenv(T.ENV_SOURCE, "hub")
    hub = T.write_task_dir(tmp_path / "hub_tasks")
    gqa = yaml.load((hub / "stgc_gqa.yaml").read_text(), Loader=T._Loader)
    assert gqa["dataset_path"] == "lmms-lab-encoder/GQA" and gqa["process_docs"].endswith("gqa_process_docs")
    assert gqa["metadata"]["source"] == "hub"

    monkeypatch.setenv(T.ENV_SOURCE, "mini")
    monkeypatch.setenv(T.ENV_MINI_ROOT, str(tmp_path / "elsewhere"))
    pope = yaml.load(
        (T.write_task_dir(tmp_path / "t3") / "_stgc_pope_template.yaml").read_text(), Loader=T._Loader
    )
    assert pope["dataset_path"] == str(tmp_path / "elsewhere" / "pope")

    with pytest.raises(ValueError, match="unknown evaluation source 'cloud'"):
        T.write_task_dir(tmp_path / "t4", source="cloud")
    with pytest.raises(ValueError, match="unknown task.*stgc_nope.*valid tasks: stgc_chartqa"):
        T.expand_tasks(["stgc_gqa", "stgc_nope"])
    assert T.expand_tasks(["stgc_mme", "moe-llava"]) == [
        "stgc_mme",
        *(t for t in T.SUITES["moe-llava"] if t != "stgc_mme"),
    ]


@pytest.mark.parametrize(
    ("reply", "parsed"),
    [
        ("Yes", "yes"),
        ("Yes.", "yes"),
        ("No.", "no"),
        ("no", "no"),
        ("There is not a cat.", "no"),
        ("Yes, there is. No doubt.", "yes"),
        ("No, there is none", "no"),
        ("Maybe", "yes"),
        ("NO", "yes"),
    ],
)
def test_pope_moellava_parse(reply, parsed):
    # "NO" -> yes: MoE-LLaVA's eval_pope.py matches only "No", "no" and "not" (kept verbatim).
    assert U.pope_moellava_parse(reply) == parsed


@pytest.mark.parametrize(
    ("reply", "parsed"),
    [
        ("A", "A"),
        ("B. north", "B"),
        ("B.north", "FAILED"),
        ("The answer is C.", "C"),
        ("I think. The answer is D.", "D"),
        ("The answer is A. The answer is B.", "FAILED"),
        ("a", "FAILED"),
    ],
)
def test_sqa_moellava_parse(reply, parsed):
    assert U.sqa_moellava_parse(reply) == parsed


# ---------------------------------------------------------------- the whole pipeline on fixed predictions


def _gold(doc: dict) -> str:
    if "choices" in doc:  # ScienceQA: the answer is an index into choices
        return "ABCDE"[doc["answer"]]
    if "answers" in doc:
        first = doc["answers"][0]
        return first["answer"] if isinstance(first, dict) else first
    return str(doc["answer"])


def reply(task: str, doc: dict) -> str:
    """A fixed, doc-dependent mix of right, wrong and differently formatted answers."""
    gold = _gold(doc)
    candidates = [
        gold,
        gold.capitalize(),
        f" {gold.upper()}.",
        "purple",
        f"The answer is {gold}.",
        f"{gold}. because",
        "Yes.",
        "No, there is not.",
        "unanswerable",
        f"{gold}!",
    ]
    key = f"{doc.get('question_id')}|{doc.get('question')}|{doc.get('index')}|{doc.get('answer')}"
    return candidates[zlib.crc32(key.encode()) % len(candidates)]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    tmp = tmp_path_factory.mktemp("pipeline")
    root = write_tiny_suite(tmp / "mini", n=8)
    task_dir = T.write_task_dir(tmp / "tasks", source="mini", mini_root=root)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    args = argparse.Namespace(output_path=str(tmp / "out"), process_with_media=False)
    results = simple_evaluate(
        model=scripted_model_class()(reply),
        tasks=T.list_tasks(),
        task_manager=manager,
        cli_args=args,
        bootstrap_iters=0,
        log_samples=False,
    )
    return root, results, args


def _docs(root: Path, info: T.TaskInfo) -> list[dict]:
    from datasets import load_from_disk

    rows = load_from_disk(str(root / info.benchmark))[SPLITS[info.benchmark]]
    if info.benchmark == "pope":
        cat = {"adv": "adversarial", "pop": "popular", "random": "random"}[info.name.rsplit("_", 1)[1]]
        rows = rows.filter(lambda r: r["category"] == cat)
    return list(rows)


def _expected(info: T.TaskInfo, docs: list[dict], builtin_cfg: dict, args) -> dict[str, float]:
    """lmms-eval's own process_results + aggregation (from the built-in task config) on the same replies."""
    from lmms_eval.api.metrics import anls, exact_match_hf_evaluate

    process = builtin_cfg.get("process_results")
    if info.protocol == T.MOE_LLAVA and info.benchmark == "pope":
        process = U.pope_moellava_process_results
    elif info.protocol == T.MOE_LLAVA and info.benchmark == "scienceqa_img":
        process = U.sqa_moellava_process_results
    per_metric: dict[str, list] = {}
    for doc in docs:
        pred = reply(info.name, doc).strip()
        if callable(process):
            scored = process(copy.deepcopy(doc), [pred])
        elif info.benchmark == "docvqa":
            scored = anls(references=doc["answers"], predictions=[pred])
        else:  # gqa: the registry's exact_match with the YAML's options
            scored = exact_match_hf_evaluate(
                predictions=[pred], references=[doc["answer"]], ignore_case=True, ignore_punctuation=True
            )
        for key, value in scored.items():
            per_metric.setdefault(key, []).append(value)
    out = {}
    for m in builtin_cfg["metric_list"]:
        agg, name = m.get("aggregation", "mean"), m["metric"]
        if name == "submission" or name not in per_metric:
            continue
        if agg == "mean":
            out[name] = statistics.mean(per_metric[name])
        elif "args" in agg.__code__.co_varnames[: agg.__code__.co_argcount]:
            out[name] = agg(per_metric[name], args=args)
        else:
            out[name] = agg(per_metric[name])
    return out


@pytest.mark.parametrize("name", [n for n in T.list_tasks() if not T.TASKS[n].subtasks])
def test_pipeline_equals_lmms_eval_scoring(pipeline, builtin_manager, name):
    root, results, args = pipeline
    info = T.TASKS[name]
    builtin = "pope" if info.benchmark == "pope" else info.builtin
    builtin_cfg = builtin_manager._get_config(builtin)
    docs = _docs(root, info)
    expected = _expected(info, docs, builtin_cfg, args)
    assert expected, name
    got = results["results"][name]
    ours = {m["metric"] for m in _resolved_template(name)["metric_list"]}
    for metric, value in expected.items():
        if metric in ours:  # the MoE-LLaVA POPE variant swaps pope_yes_ratio for pope_pred_yes_ratio
            assert got[f"{metric},none"] == pytest.approx(value), (name, metric)
    if "pope_pred_yes_ratio" in ours:
        parsed = [U.pope_moellava_parse(reply(name, d).strip()) for d in docs]
        assert got["pope_pred_yes_ratio,none"] == pytest.approx(parsed.count("yes") / len(parsed))
    assert results["n-samples"][name]["effective"] == len(docs)
    assert results["versions"][name] == 1.0


@pytest.mark.parametrize("group", [n for n in T.list_tasks() if T.TASKS[n].subtasks])
def test_pope_groups_are_unweighted_category_means(pipeline, group):
    _, results, _ = pipeline
    subtasks = T.TASKS[group].subtasks
    for metric in ("pope_f1_score", "pope_accuracy"):
        values = [results["results"][s][f"{metric},none"] for s in subtasks]
        assert results["results"][group][f"{metric},none"] == pytest.approx(statistics.mean(values))
    assert len({results["results"][s]["pope_f1_score,none"] for s in subtasks}) > 1  # the fixture varies


def test_generated_mini_suite_matches_the_tasks(tmp_path):
    """The suite `stgc data` generates runs through every task, and gold answers score (near) the maximum."""
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from stgc.data import BENCHMARKS, generate_suite

    assert {name: spec.split for name, spec in BENCHMARKS.items()} == T.MINI_SPLITS
    for info in T.TASKS.values():
        assert info.benchmark in BENCHMARKS
    root = tmp_path / "mini"
    generate_suite(root, docs=8, train_size=0, image_size=64)  # 8 POPE rows: all 3 categories
    task_dir = T.write_task_dir(tmp_path / "tasks", source="mini", mini_root=root)
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    args = argparse.Namespace(output_path=str(tmp_path / "out"), process_with_media=False)
    model = scripted_model_class()(lambda task, doc: _gold(doc))
    res = simple_evaluate(
        model=model, tasks=T.list_tasks(), task_manager=manager, cli_args=args, bootstrap_iters=0
    )
    for name in T.list_tasks():
        value = res["results"][name][f"{T.HEADLINE[name]},none"]
        if T.TASKS[name].benchmark in ("vqav2", "vizwiz", "textvqa"):
            assert value >= 0.6, name  # VQA soft accuracy of one annotator's answer
        elif T.TASKS[name].benchmark == "mmbench":
            assert value == 100.0
        elif name == "stgc_mme":
            assert value > 0 and value % 200 == 0  # acc + acc+ = 200 per perception category
        else:
            assert value == 1.0, name
