"""The FedKSeed communication notebook runs top to bottom (tiny model) and prints its table."""

import time


def test_fedkseed_notebook_runs_and_prints_the_table(execute_notebook):
    t0 = time.perf_counter()
    _, text = execute_notebook("fedkseed_communication.ipynb", timeout=120)
    assert "| method | bytes down | bytes up |" in text
    assert "FedKSeed, rounds 2-" in text and "LoRA FedAvg r=8" in text
    assert "full-parameter FedAvg" in text
    assert "server loss" in text and "upload = 8 x 15 steps + 256 header bytes" in text
    # the real federation uploaded 8 bytes per step + two .npy headers
    assert f"{8 * 15 + 256:>15,}" in text
    assert time.perf_counter() - t0 < 120
