"""stgc.logs: at default verbosity a library call's prints and bars vanish, its warnings pass; the phase bar
made outside keeps drawing; --verbose leaves everything as the libraries print it."""

from __future__ import annotations

import sys

from stgc import logs


def _library_call() -> None:
    from tqdm import tqdm

    print("MMBench category table")
    for _ in tqdm(range(3), desc="Postprocessing", disable=False, file=sys.stderr):
        pass
    print("UserWarning: something worth knowing", file=sys.stderr)


def test_quiet_drops_prints_and_bars_keeps_warnings(monkeypatch, capsys):
    monkeypatch.setenv(logs.ENV_VERBOSE, "0")
    with logs.Phase("evaluate", 2, unit="task") as phase:
        with logs.quiet_output():
            _library_call()
        phase.update(2)
    out, err = capsys.readouterr()
    assert "MMBench" not in out and "Postprocessing" not in err
    assert "UserWarning: something worth knowing" in err and "evaluate" in err and "2/2 task" in err


def test_verbose_shows_everything(monkeypatch, capsys):
    monkeypatch.setenv(logs.ENV_VERBOSE, "1")
    with logs.quiet_output():
        _library_call()
    out, err = capsys.readouterr()
    assert "MMBench" in out and "Postprocessing" in err
