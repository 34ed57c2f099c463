"""The README's Python examples run as written, each in a fresh namespace and folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_its_two_python_examples():
    assert len(BLOCKS) == 2


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"readme_block_{index}"}
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), namespace)
    printed = capsys.readouterr().out.split()
    if index == 0:
        # Freshly binarised, EBB's outer levels count two bases; as deployed, every
        # quantized weight has one sign bit: pure 1-bit. The packed file restores it.
        assert float(printed[0]) > 1.0
        assert float(printed[3]) == pytest.approx(1.0)
        assert (tmp_path / "model.bdm").is_file()
        assert type(namespace["restored"]).__name__ == "UNet2DModel"
    else:
        loss, noise, lrm, ebb = (float(v) for v in printed)
        assert loss == pytest.approx(noise + namespace["config"].lrm.weight * lrm + ebb, rel=1e-4)
        assert lrm > 0  # the LRM term is in the step
        assert ebb == 0.0  # step 19 is past EBB's switch (half the run): no second basis
