"""Every example runs (with a tiny budget) and prints what it promises."""

import runpy


def test_quickstart(capsys):
    runpy.run_path("examples/quickstart.py", run_name="__main__")
    out = capsys.readouterr().out
    assert "prompt:" in out and "completion:" in out and "score:" in out
    assert "ref logp" in out  # the ansi render's table header
