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
