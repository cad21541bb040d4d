"""Bad input on the command line: one clear line on stderr and exit code 2, never a traceback."""

import pytest

from stgc.cli import main


@pytest.mark.parametrize(
    "argv, words",
    [
        (["convert", "/nonexistent-folder", "--out", "OUT"], "no config.json"),
        (["bench", "moe", "--tokens", "0"], "tokens="),
        (["analyze", "routing", "FOLDER", "--out", "OUT"], "is a folder"),
        (["pretrain-lm", "--out", "FOLDER"], "exists; remove it"),
        (["pretrain-lm", "--out", "OUT", "--tokenizer", "/nonexistent-folder"], "no tokenizer in"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, words, tmp_path, capsys):
    argv = [str(tmp_path) if a == "FOLDER" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_pretrain_lm_bad_settings_are_one_line(tmp_path, capsys):
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text("{}")  # checked before it is read
    argv = ["pretrain-lm", "--out", str(tmp_path / "out"), "--tokenizer", str(tmp_path / "tok")]
    assert main([*argv, "--batch-size", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "batch_size=0" in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
