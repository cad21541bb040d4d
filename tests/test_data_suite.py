"""The generated mini suite: layout, schema, determinism, train/eval disjointness, bad input and
atomic writes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict, load_from_disk

from stgc.data import suite as suite_mod
from stgc.data.generate import eval_rows
from stgc.data.params import BENCHMARK_NAMES
from stgc.data.prompts import doc_to_text
from stgc.data.registry import BENCHMARKS, check_row, check_schema
from stgc.data.render import image_hash
from stgc.data.suite import MARKER, generate_suite, load_benchmark, load_train, read_suite_info

SMALL = {"docs": 12, "train_size": 80, "image_size": 64, "seed": 3}


@pytest.fixture(scope="module")
def small_suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("suite") / "mini"
    generate_suite(out, **SMALL)
    return out


def test_layout_and_marker(small_suite: Path) -> None:
    info = read_suite_info(small_suite)
    assert info["params"]["benchmarks"] == list(BENCHMARK_NAMES)
    assert sorted(p.name for p in small_suite.iterdir()) == sorted(
        [*BENCHMARK_NAMES, "train", "tokenizer", MARKER]
    )
    for name, spec in BENCHMARKS.items():
        ds = load_from_disk(str(small_suite / name))
        assert isinstance(ds, DatasetDict) and list(ds) == [spec.split], name
        assert len(ds[spec.split]) == info["benchmarks"][name]["rows"]
        # exact row count, except whole groups (MME pairs, MMBench 4 rotations) rounding up
        group = {"mme": 2, "mmbench": 4}.get(name, 1)
        assert SMALL["docs"] <= len(ds[spec.split]) < SMALL["docs"] + group, name
    train = load_from_disk(str(small_suite / "train"))
    assert list(train) == ["train"] and len(train["train"]) == SMALL["train_size"]
    assert set(train["train"].column_names) == {"id", "image", "conversations", "benchmark", "answer_format"}


def test_every_row_passes_the_schema_check(small_suite: Path) -> None:
    for name in BENCHMARKS:
        ds = load_benchmark(small_suite, name)
        check_schema(name, ds)
        for row in ds:
            check_row(name, row)
            assert row["image"].size == (SMALL["image_size"], SMALL["image_size"])


def test_benchmark_specific_structure(small_suite: Path) -> None:
    mme = load_benchmark(small_suite, "mme").remove_columns("image").to_list()
    by_qid: dict[str, list[str]] = {}
    for r in mme:
        by_qid.setdefault(r["question_id"], []).append(r["answer"])
    assert all(sorted(a) == ["No", "Yes"] for a in by_qid.values())  # MME: exactly one yes + one no per image

    mmb = load_benchmark(small_suite, "mmbench").remove_columns("image").to_list()
    groups: dict[int, list[dict]] = {}
    for r in mmb:
        groups.setdefault(r["index"] % 1_000_000, []).append(r)
    for rows in groups.values():  # the 4 circular rotations: same question, the gold option at 4 letters
        assert len(rows) == 4 and len({r["question"] for r in rows}) == 1
        golds = {r[r["answer"]] for r in rows}
        assert len(golds) == 1 and sorted(r["answer"] for r in rows) == ["A", "B", "C", "D"]

    pope = load_benchmark(small_suite, "pope")
    assert set(pope["category"]) == {"adversarial", "popular", "random"}
    vizwiz = load_benchmark(small_suite, "vizwiz")
    assert "unanswerable" in vizwiz["category"]


def test_determinism_same_seed_same_rows(tmp_path: Path) -> None:
    kw = {"docs": 5, "train_size": 12, "image_size": 64, "seed": 11, "benchmarks": ["textvqa", "mmbench"]}
    a, b = tmp_path / "a", tmp_path / "b"
    generate_suite(a, **kw)
    generate_suite(b, **kw)
    for name in ["textvqa", "mmbench", "train"]:
        da, db = load_from_disk(str(a / name)), load_from_disk(str(b / name))
        split = list(da)[0]
        assert da[split].to_list() == db[split].to_list(), name  # images compare as PNG bytes
    assert (a / "tokenizer" / "tokenizer.json").read_text() == (
        b / "tokenizer" / "tokenizer.json"
    ).read_text()
    # a benchmark's rows do not depend on which other benchmarks are generated
    alone, _ = eval_rows("textvqa", 5, 11, 64)
    assert [r["question"] for r in alone] == load_benchmark(a, "textvqa")["question"]
    other, _ = eval_rows("textvqa", 5, 12, 64)
    assert [image_hash(r["image"]) for r in other] != [image_hash(r["image"]) for r in alone]


def test_answers_do_not_depend_on_image_size() -> None:
    small, _ = eval_rows("chartqa", 6, 0, 64)
    large, _ = eval_rows("chartqa", 6, 0, 160)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "image"} for r in rows]  # noqa: E731
    assert strip(small) == strip(large)


def test_train_and_eval_share_no_image_and_no_question_image_pair(small_suite: Path) -> None:
    eval_pairs, eval_hashes = set(), set()
    for name in BENCHMARKS:
        for row in load_benchmark(small_suite, name):
            h = image_hash(row["image"])
            eval_hashes.add(h)
            eval_pairs.update((h, doc_to_text(name, row, ocr=ocr)) for ocr in (False, True))
    train = load_train(small_suite)
    train_hashes = set()
    for row in train:
        h = image_hash(row["image"])
        train_hashes.add(h)
        for turn in row["conversations"]:
            if turn["from"] == "human":
                assert (h, turn["value"].removeprefix("<image>\n")) not in eval_pairs
    assert not eval_hashes & train_hashes


def test_train_excludes_eval_images_even_when_pixels_collide(tmp_path: Path) -> None:
    # Pretend every image of the training stream's first units were evaluation images: they must be skipped.
    from stgc.data.generate import iter_units

    first = [h for _, (_, _, h) in zip(range(3), iter_units("vqav2", 0, 64, "train"))]
    got = [h for _, (_, _, h) in zip(range(3), iter_units("vqav2", 0, 64, "train", exclude=set(first)))]
    assert not set(first) & set(got)


def test_mixture_formats_and_prompts(small_suite: Path) -> None:
    train = load_train(small_suite).remove_columns("image").to_list()
    formats = {r["answer_format"] for r in train}
    assert {"single_word", "option_letter", "number", "yes_no"} <= formats
    assert formats <= {"single_word", "option_letter", "number", "yes_no", "free_text"}
    for r in train:
        conv = r["conversations"]
        assert conv[0]["from"] == "human" and conv[0]["value"].startswith("<image>\n")
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert sum(t["value"].count("<image>") for t in conv) == 1
    posts = [t["value"] for r in train for t in r["conversations"] if t["from"] == "human"]
    assert any(p.endswith("\nAnswer the question using a single word or phrase.") for p in posts)
    assert any(
        p.endswith("\nAnswer with the option's letter from the given choices directly.") for p in posts
    )


# ---------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"docs": 0}, "[1, 100000]"),
        ({"image_size": 32}, "[64, 2048]"),
        ({"image_size": 4096}, "[64, 2048]"),
        ({"train_size": -1}, "[0, 1000000]"),
        ({"vocab_size": 10}, "[300, 100000]"),
        ({"benchmarks": ["vqav2", "coco"]}, "valid names: vqav2, gqa"),
    ],
)
def test_bad_parameters_raise_with_the_valid_range(tmp_path: Path, kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        generate_suite(tmp_path / "x", **{"docs": 2, "train_size": 0, "image_size": 64, **kwargs})
    assert needle in str(err.value)
    assert not (tmp_path / "x").exists()


def test_existing_suite_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "s"
    kw = {"docs": 2, "train_size": 0, "image_size": 64, "benchmarks": ["pope"]}
    generate_suite(out, **kw)
    with pytest.raises(ValueError, match="--overwrite"):
        generate_suite(out, **kw)
    info = generate_suite(out, **{**kw, "benchmarks": ["gqa"]}, overwrite=True)
    assert info["params"]["benchmarks"] == ["gqa"]
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "gqa"]


def test_foreign_folder_is_never_replaced(tmp_path: Path) -> None:
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="not a mini suite"):
            generate_suite(out, docs=2, train_size=0, image_size=64, overwrite=overwrite)
    assert (out / "notes.txt").read_text() == "mine"


def test_interrupted_write_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash while training the tokenizer")

    monkeypatch.setattr(suite_mod, "train_tokenizer", boom)
    out = tmp_path / "new"
    with pytest.raises(RuntimeError, match="simulated"):
        generate_suite(out, docs=2, train_size=5, image_size=64, benchmarks=["vqav2"])
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp folder left behind either

    # a crash while replacing an existing suite leaves the old suite untouched
    monkeypatch.undo()
    old = tmp_path / "old"
    generate_suite(old, docs=2, train_size=0, image_size=64, benchmarks=["mme"])
    before = (old / MARKER).read_text()
    monkeypatch.setattr(suite_mod, "train_tokenizer", boom)
    with pytest.raises(RuntimeError):
        generate_suite(old, docs=3, train_size=5, image_size=64, benchmarks=["vqav2"], overwrite=True)
    assert (old / MARKER).read_text() == before and (old / "mme").exists() and not (old / "vqav2").exists()


def test_stale_temp_folder_of_a_dead_run_is_removed(tmp_path: Path) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    stale = tmp_path / f".mini.tmp-{proc.pid}-deadbeef"
    stale.mkdir()
    (stale / "half.arrow").write_text("x")
    generate_suite(tmp_path / "mini", docs=1, train_size=0, image_size=64, benchmarks=["gqa"])
    assert not stale.exists()


def test_marker_is_written_last_and_describes_the_suite(tmp_path: Path) -> None:
    out = tmp_path / "m"
    info = generate_suite(out, docs=3, train_size=10, image_size=64, benchmarks=["chartqa"])
    on_disk = json.loads((out / MARKER).read_text())
    assert on_disk == info
    assert info["benchmarks"]["chartqa"]["rows"] == 3 and info["benchmarks"]["chartqa"]["split"] == "test"
    assert info["train"]["rows"] == 10
    newest = max((p for p in out.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime_ns)
    assert newest.name == MARKER


def test_incomplete_folder_is_not_loadable(tmp_path: Path) -> None:
    (tmp_path / "half").mkdir()
    with pytest.raises(ValueError, match="not a complete mini suite"):
        load_benchmark(tmp_path / "half", "vqav2")


def test_a_suite_of_another_generator_version_is_refused_with_the_fix(tmp_path: Path) -> None:
    out = tmp_path / "m"
    generate_suite(out, docs=3, train_size=10, image_size=64, benchmarks=["pope"])
    assert read_suite_info(out)["generator_version"] == suite_mod.GENERATOR_VERSION
    info = json.loads((out / MARKER).read_text())
    (out / MARKER).write_text(json.dumps({**info, "generator_version": suite_mod.GENERATOR_VERSION - 1}))
    # the command that regenerates it keeps the suite's own parameters
    fix = rf"generator version 1.*`stgc data --out {out} --docs 3 --train-size 10 --image-size 64 --seed 0 "
    fix += r"--vocab-size \d+ --benchmarks pope --overwrite`"
    for load in (lambda: load_train(out), lambda: load_benchmark(out, "pope")):
        with pytest.raises(ValueError, match=fix):
            load()
    from evals.demo import _check_data
    from evals.run import EvalInputError, check_mini_folder

    with pytest.raises(EvalInputError, match=fix):  # stgc eval / a sweep, before lmms-eval starts
        check_mini_folder(out, "pope")
    from analysis.conflict_probe import _load_rows
    from evals.tasks import write_task_dir

    with pytest.raises(ValueError, match=fix):  # capture and lmms-eval's --include_path folder
        write_task_dir(tmp_path / "tasks", source="mini", mini_root=out)
    with pytest.raises(ValueError, match=fix):  # stgc analyze conflict on the suite's training set
        _load_rows(out / "train", 4, 0)
    with pytest.raises(ValueError, match=f"remove {out} and runs/tiny"):  # make demo, before training
        _check_data(out)
    from stgc.cli import main

    assert main(["demo", "--data", str(out), "--out", str(tmp_path / "demo")]) == 2
    assert not (tmp_path / "demo").exists()


# -------------------------------------------------------------------------------------- schema check


def test_check_schema_names_missing_columns_and_the_fix() -> None:
    ds = Dataset.from_dict({"question": ["q"], "answer": ["yes"]})
    with pytest.raises(ValueError) as err:
        check_schema("pope", ds)
    msg = str(err.value)
    assert "['image', 'question_id', 'category']" in msg and "pope" in msg and "--overwrite" in msg
    with pytest.raises(ValueError, match="split 'test'"):
        check_schema("pope", DatasetDict({"validation": ds}))
    with pytest.raises(ValueError, match="valid names"):
        check_schema("nope", ds)


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_prints_one_line_and_exits_nonzero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from stgc.cli import main

    assert main(["data", "--out", str(tmp_path / "c"), "--benchmarks", "vqa"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        len(err) == 1
        and err[0].startswith("stgc data: error: unknown mini benchmark")
        and "Traceback" not in err[0]
    )
    assert main(["data", "--out", str(tmp_path / "c"), "--image-size", "10"]) == 2
    assert "--image-size" in capsys.readouterr().err
    args = ["data", "--out", str(tmp_path / "c"), "--docs", "2", "--train-size", "0", "--image-size", "64"]
    assert main([*args, "--benchmarks", "docvqa", "--quiet"]) == 0
    assert main([*args, "--benchmarks", "docvqa"]) == 2
    assert "--overwrite" in capsys.readouterr().err
