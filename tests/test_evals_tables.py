"""Long -> wide tables: a golden rendered CSV, the paired test, version separation and bad input."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pandas as pd
import pytest
from scipy import stats

from evals.tables import LONG_COLUMNS, render_markdown, render_text, wide_table, write_wide_csv

GOLDEN = Path(__file__).parent / "golden" / "evals_wide_table.csv"
GOLDEN_MD = Path(__file__).parent / "golden" / "evals_table.md"

# (method, seed) -> (gqa exact_match, pope f1, mme perception); moe-lite has one seed only.
_VALUES = {
    ("baseline", 0): (0.50, 0.80, 1200.0),
    ("baseline", 1): (0.52, 0.82, 1250.5),
    ("baseline", 2): (0.49, 0.81, 1190.0),
    ("stgc", 0): (0.55, 0.83, 1300.0),
    ("stgc", 1): (0.54, 0.86, 1280.0),
    ("stgc", 2): (0.53, 0.84, 1310.25),
    ("moe-lite", 0): (0.40, 0.70, 1000.0),
}


def fixed_long() -> pd.DataFrame:
    rows = []
    for (method, seed), (gqa, pope, mme) in _VALUES.items():
        common = dict(
            method=method,
            seed=seed,
            checkpoint=f"runs/{method}-s{seed}/checkpoint-10",
            git_revision="abc1234",
            date="2026-01-01T00:00:00Z",
        )
        rows += [
            dict(common, task="stgc_gqa", task_version="1.0/mini", metric="exact_match", value=gqa, n=100),
            dict(
                common,
                task="stgc_pope_moellava",
                task_version="1.0/mini",
                metric="pope_f1_score",
                value=pope,
                n=300,
            ),
            dict(
                common,
                task="stgc_pope_moellava",
                task_version="1.0/mini",
                metric="pope_accuracy",
                value=pope - 0.1,
                n=300,
            ),
            dict(
                common,
                task="stgc_mme",
                task_version="1.0/mini",
                metric="mme_perception_score",
                value=mme,
                n=40,
            ),
        ]
    # moe-lite's textvqa came from another task version: it must get its own column.
    for (method, seed), (gqa, _, _) in _VALUES.items():
        version = "2.0/mini" if method == "moe-lite" else "1.0/mini"
        rows.append(
            dict(
                method=method,
                seed=seed,
                checkpoint="c",
                task="stgc_textvqa_val_ocr",
                task_version=version,
                metric="exact_match",
                value=gqa / 2,
                n=50,
                git_revision="def5678",
                date="2026-01-02T00:00:00Z",
            )
        )
    return pd.DataFrame(rows, columns=list(LONG_COLUMNS))


def test_golden_wide_csv(tmp_path):
    wide = wide_table(fixed_long(), baseline="baseline")
    out = write_wide_csv(wide, tmp_path / "table.csv")
    if os.environ.get("STGC_UPDATE_GOLDEN") == "1":  # regenerate deliberately, review the diff, commit
        GOLDEN.write_text(out.read_text())
    assert out.read_text() == GOLDEN.read_text()


def test_golden_markdown_table():
    """table.md from a fixed scores table: one row per method, each benchmark's headline on its stated scale,
    mean ± std (+delta), a significance mark only where >= 3 paired seeds exist, a reference row."""
    reference = {"constant answer": {"stgc_gqa": 0.135, "stgc_pope_moellava": 0.6667, "stgc_mme": 250.0}}
    text = render_markdown(fixed_long(), baseline="baseline", reference=reference)
    if os.environ.get("STGC_UPDATE_GOLDEN") == "1":
        GOLDEN_MD.write_text(text)
    assert text == GOLDEN_MD.read_text()
    lines = text.splitlines()
    assert lines[0].startswith("| method | seeds | GQA acc. (%) | POPE F1 (%) | MME perception (points) |")
    assert "| stgc | 0 1 2 | 54.0 ± 1.0 (+3.7) | 84.3 ± 1.5 (+3.3**) |" in text  # 3 paired seeds: tested
    assert "| moe-lite | 0 | 40.0 (-10.3) |" in text  # 1 seed: no std, no mark
    assert "| constant answer | – | 13.5 | 66.7 | 250 |" in text
    terminal = render_text(fixed_long(), baseline="baseline", reference=reference)
    assert max(len(line) for line in terminal.splitlines()[:6]) < 140 and "vs baseline" in terminal


def test_values_and_paired_test():
    long = fixed_long()
    wide = wide_table(long, baseline="baseline").set_index("method")
    assert list(wide.index) == ["baseline", "stgc", "moe-lite"]
    base = [_VALUES[("baseline", s)][0] for s in range(3)]
    ours = [_VALUES[("stgc", s)][0] for s in range(3)]
    assert wide.loc["stgc", "stgc_gqa mean"] == pytest.approx(sum(ours) / 3)
    assert wide.loc["stgc", "stgc_gqa std"] == pytest.approx(pd.Series(ours).std(ddof=1))
    assert wide.loc["stgc", "stgc_gqa delta"] == pytest.approx((sum(ours) - sum(base)) / 3)
    assert wide.loc["stgc", "stgc_gqa p"] == pytest.approx(stats.ttest_rel(ours, base).pvalue)
    assert wide.loc["stgc", "stgc_gqa [lmms-eval]"] == "0.540 ± 0.010"
    assert "stgc_pope_moellava [moe-llava]" in wide.columns  # the protocol is in the column name
    assert math.isnan(wide.loc["moe-lite", "stgc_gqa p"]) and math.isnan(wide.loc["moe-lite", "stgc_gqa std"])
    assert wide.loc["moe-lite", "stgc_gqa [lmms-eval]"] == "0.400"
    assert "stgc_gqa p n/a: 1 paired seed(s)" in wide.loc["moe-lite", "notes"]
    # two versions of one task: two columns, never averaged, and a note
    assert wide.loc["stgc", "stgc_textvqa_val_ocr@1.0/mini seeds"] == 3
    assert wide.loc["moe-lite", "stgc_textvqa_val_ocr@2.0/mini seeds"] == 1
    assert wide.loc["moe-lite", "stgc_textvqa_val_ocr@1.0/mini seeds"] == 0
    assert "stgc_textvqa_val_ocr: 2 task versions" in wide.loc["baseline", "notes"]


def test_bad_input():
    long = fixed_long()
    with pytest.raises(ValueError, match="baseline method 'dense' has no scores"):
        wide_table(long, baseline="dense")
    with pytest.raises(ValueError, match="sharing"):
        wide_table(pd.concat([long, long.iloc[:1]]), baseline="baseline")
    with pytest.raises(ValueError, match="lacks column"):
        wide_table(long.drop(columns="task_version"), baseline="baseline")
    with pytest.raises(ValueError, match="no headline metric"):
        wide_table(long[long["task"] == "stgc_gqa"].assign(task="mystery"), baseline="baseline")
