"""notebooks/offsite_tuning.ipynb runs top to bottom (tiny model) and shows the four numbers
and the emulator-depth sweep."""


def test_offsite_notebook_runs_and_shows_four_numbers(execute_notebook):
    nb, text = execute_notebook("offsite_tuning.ipynb", timeout=600)  # hang guard
    assert not any(out.get("output_type") == "error" for c in nb.cells
                   for out in c.get("outputs", []))
    for column in ("full zero-shot", "emulator + original", "emulator + tuned", "plug-in"):
        assert column in text
    assert "test accuracy:" in text and "down MB / client" in text
    assert "clients never see [3, 4]" in text
    assert "offsite notebook: OK" in text
    # the depth sweep ran (tiny, --quick) and its table was read back: depths 0, 1, 2
    assert "benchmarks/offsite_depth.py --model tiny --quick" in text
    assert "plug-in - zero-shot (acc)" in text
    assert any(line.split()[:3] == ["2", "4", "of"] for line in text.splitlines())
    # early stopping (tiny, --quick --val-size 8): the round kept and its test accuracy
    assert "--val-size 8" in text and "round kept: " in text
