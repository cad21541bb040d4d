"""Issue 17, inputs and reports: data values checked on load (training and evaluation rows), the
traceback cases of `stgc eval` / `analyze` / `train` become one line with exit 2, and `stgc report` replaces
the previous report only when every notebook succeeded."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
import pytest
from datasets import Dataset, DatasetDict, load_from_disk
from PIL import Image

from evals.testing import write_tiny_checkpoint, write_tiny_suite
from stgc.cli import main


def _cli(capsys, argv: list[str]) -> tuple[int, str]:
    """`stgc <argv>`: its exit code and its stderr, which must be one line without a traceback."""
    capsys.readouterr()  # what the test printed before (dataset saving progress)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) <= 1 and "Traceback" not in err, err
    return code, err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint-3")


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> Path:
    return write_tiny_suite(tmp_path_factory.mktemp("mini"), n=2, names=["gqa"])


def _copy(checkpoint: Path, dest: Path) -> Path:
    import shutil

    return Path(shutil.copytree(checkpoint, dest))


# ------------------------------------------------------------------------------------- data values


def _training_set(folder: Path, rows: list[dict]) -> Path:
    Dataset.from_list(rows).save_to_disk(str(folder))
    return folder


def _train_argv(tmp_path: Path, data: Path, tokenizer: Path) -> list[str]:
    return [
        "train", "tiny", "--output-dir", str(tmp_path / "run"), "model.init=scratch", f"data.train={data}",
        f"data.tokenizer={tokenizer}", "training.max_steps=1", "training.batch_size=2",
        "training.trainable=all",
    ]  # fmt: skip


def test_training_rows_are_checked_on_load(tmp_path, checkpoint, capsys):
    image = Image.new("RGB", (8, 8))
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    good = {"id": "r0", "image": image, "conversations": turns}
    bad = {"id": "r1", "image": image, "conversations": [turns[0], {"from": "gpt", "value": None}]}
    data = _training_set(tmp_path / "none_answer", [good, bad, good])
    code, err = _cli(capsys, _train_argv(tmp_path, data, checkpoint))
    assert code == 2
    assert f"data.train='{data}' row 1 (id 'r1'): conversations[1].value (gpt turn) is None" in err
    assert not list((tmp_path / "run").glob("checkpoint-*"))

    # a training set without the conversations column
    data = _training_set(tmp_path / "no_column", [{"id": "r0", "image": image, "text": "red"}] * 2)
    code, err = _cli(capsys, _train_argv(tmp_path, data, checkpoint))
    assert code == 2 and "has no 'conversations' column" in err


def test_evaluation_rows_are_checked_before_lmms_eval(tmp_path, checkpoint, suite, capsys):
    from evals.run import EvalInputError, check_mini_folder

    rows = load_from_disk(str(suite / "gqa"))["testdev"]
    for field, value, words in (("answer", None, "answer is None"), ("question", " ", "question is empty")):
        root = tmp_path / field
        changed = rows.to_list()
        changed[1][field] = value
        DatasetDict({"testdev": Dataset.from_list(changed, features=rows.features)}).save_to_disk(
            str(root / "gqa")
        )
        with pytest.raises(EvalInputError, match=f"{root / 'gqa'} \\(gqa\\) row 1 \\(id '.*'\\): {words}"):
            check_mini_folder(root, "gqa")
        code, err = _cli(capsys, ["eval", str(checkpoint), "--tasks", "stgc_gqa", "--mini-root", str(root)])
        assert code == 2 and words in err
    check_mini_folder(suite, "gqa")  # the generated rows pass


# ------------------------------------------------------------------- tracebacks that became one line


def test_truncated_weights_are_one_line_under_eval_and_capture(tmp_path, checkpoint, suite, capsys):
    ckpt = _copy(checkpoint, tmp_path / "checkpoint-3")
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = _cli(capsys, ["eval", str(ckpt), "--tasks", "stgc_gqa", "--mini-root", str(suite)])
    assert code == 2 and "model.safetensors is corrupt or truncated" in err
    out = tmp_path / "traces.parquet"
    argv = ["analyze", "capture", str(ckpt), "--tasks", "gqa", "--out", str(out), "--data-root", str(suite)]
    code, err = _cli(capsys, argv)
    assert code == 2 and "model.safetensors is corrupt or truncated" in err


def test_unknown_moe_key_in_the_checkpoint_is_one_line(tmp_path, checkpoint, suite, capsys):
    ckpt = _copy(checkpoint, tmp_path / "checkpoint-3")
    config = json.loads((ckpt / "config.json").read_text())
    config["moe"]["num_expertz"] = 4
    (ckpt / "config.json").write_text(json.dumps(config))
    code, err = _cli(capsys, ["eval", str(ckpt), "--tasks", "stgc_gqa", "--mini-root", str(suite)])
    assert code == 2
    assert "config.json does not load" in err and "num_expertz" in err


def test_max_new_tokens_zero_is_refused(capsys):
    code, err = _cli(capsys, ["eval", "/nonexistent", "--max-new-tokens", "0"])
    assert code == 2 and "--max-new-tokens 0 must be >= 1" in err


def test_damaged_and_empty_trace_files_are_named(tmp_path, capsys):
    import pyarrow.parquet as pq

    from analysis.schema import write_traces
    from tests.test_analysis_synthetic import make_traces

    meta = {"num_experts": 4, "top_k": 2, "moe_layers": [1, 3], "checkpoint": "c", "method": "m", "seed": 0}
    good = tmp_path / "good.parquet"
    write_traces(make_traces(task="stgc_gqa", moe_layers=(1, 3), num_samples=2), good, meta=meta)
    cut, empty = tmp_path / "cut.parquet", tmp_path / "empty.parquet"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    pq.write_table(pq.read_table(good).slice(0, 0), empty)  # a capture that wrote no document
    code, err = _cli(capsys, ["analyze", "routing", str(cut), "--out", str(tmp_path / "o")])
    assert code == 2 and f"trace file {cut} is not a readable Parquet file" in err
    code, err = _cli(capsys, ["analyze", "routing", str(empty), "--out", str(tmp_path / "o")])
    assert code == 2 and f"trace file {empty} has no rows" in err


def test_report_without_a_folder_uses_results_demo_or_says_what_to_pass(tmp_path, monkeypatch, capsys):
    from tests.test_report import make_results_folder

    make_results_folder(tmp_path, traces=False, conflict=False, runs=False)  # results/synthetic
    monkeypatch.chdir(tmp_path)
    code, err = _cli(capsys, ["report"])
    assert code == 2 and "the default results/demo" in err  # results/synthetic is not taken for it
    (tmp_path / "results" / "synthetic").rename(tmp_path / "results" / "demo")
    seen = []
    monkeypatch.setattr("analysis.report.build_report", lambda path, **kw: seen.append(path) or Path(path))
    assert main(["report"]) == 0 and seen == [Path("results") / "demo"]


# --------------------------------------------------------------------------------------------- report


def _notebook(path: Path, code: str) -> None:
    book = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("results_dir = None", metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell(code),
        ],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )
    nbformat.write(book, path)


WRITE_FIGURE = """from analysis.results import open_results
figures = open_results(results_dir).figures_dir
figures.mkdir(parents=True, exist_ok=True)
(figures / "{name}.png").write_bytes(b"{content}")
"""


def test_a_failing_notebook_keeps_the_previous_report(tmp_path, monkeypatch):
    from analysis import report
    from tests.test_report import make_results_folder

    results = make_results_folder(tmp_path, traces=False, conflict=False, runs=False)
    books = tmp_path / "notebooks"
    books.mkdir()
    monkeypatch.setattr(report, "NOTEBOOKS_DIR", books)
    monkeypatch.setattr(report, "NOTEBOOKS", ("a.ipynb", "b.ipynb"))
    _notebook(books / "a.ipynb", WRITE_FIGURE.format(name="a", content="first"))
    _notebook(books / "b.ipynb", WRITE_FIGURE.format(name="b", content="first"))
    reports = report.build_report(results)
    assert sorted(p.name for p in (reports / "figures").iterdir()) == ["a.png", "b.png"]
    before = {p.relative_to(reports): p.read_bytes() for p in reports.rglob("*") if p.is_file()}

    _notebook(books / "a.ipynb", WRITE_FIGURE.format(name="a", content="second"))
    _notebook(books / "b.ipynb", "raise RuntimeError('deliberate failure')")
    with pytest.raises(report.ReportError, match="b.ipynb failed .*the previous report in .* is unchanged"):
        report.build_report(results)
    after = {p.relative_to(reports): p.read_bytes() for p in reports.rglob("*") if p.is_file()}
    assert after == before  # b.png, a.png ("first"), the executed notebooks: all still there
    failed = results / "reports.failed"
    assert (failed / "figures" / "a.png").read_bytes() == b"second" and (failed / "b.html").is_file()

    _notebook(books / "b.ipynb", "pass")  # a full report that succeeds replaces everything
    report.build_report(results)
    assert sorted(p.name for p in (reports / "figures").iterdir()) == ["a.png"] and not failed.exists()
    assert not [p for p in results.iterdir() if p.name.startswith(".reports")]
    assert os.environ.get("STGC_REPORTS_DIR") is None
