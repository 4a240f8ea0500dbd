"""The README's Quick start runs as printed and does what the text says.

The block is the first ```python block under "## Quick start": random data,
epsilon 3 at delta 1e-5, 48 Poisson steps of expected batch 250 of 6000. The
text after it says that the planned steps spend the budget exactly, so
`PrivacyCallback` stops after 48 steps with a warning; this test runs the
block unchanged and checks that, so the product page cannot rot.
"""

import logging
import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def quick_start_code() -> str:
    text = README.read_text()
    section = text[text.index("## Quick start"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    if not blocks:
        raise AssertionError("No ```python block under '## Quick start'.")
    return blocks[0]


@pytest.mark.slow
def test_the_quick_start_runs_and_spends_the_budget_exactly(caplog):
    code = quick_start_code()
    namespace = {"__name__": "readme_quick_start"}
    with caplog.at_level(logging.WARNING, logger="absl"):
        exec(compile(code, str(README), "exec"), namespace)
    # 2 epochs of round(6000 / 250) = 24 steps: 48 noisy steps, which the
    # sigma calibrated for them spends exactly (the README's claim).
    assert namespace["steps"] == 48
    model = namespace["model"]
    assert int(model.optimizer.iterations.numpy()) == 48
    assert model.optimizer.noise_multiplier == namespace["sigma"] > 0
    stops = [r.getMessage() for r in caplog.records
             if "Privacy budget reached" in r.getMessage()]
    assert len(stops) == 1
    # The warning the README quotes is the one the run logs.
    quoted = re.search(r'"(Privacy budget reached: training stopped after '
                       r'\d+ noisy steps)"', " ".join(README.read_text().split()))
    assert quoted is not None
    assert stops[0].startswith(quoted.group(1) + " ")
    assert "training stopped after 48 noisy steps" in stops[0]
