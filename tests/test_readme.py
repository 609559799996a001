"""The README's usage example runs as written."""

from __future__ import annotations

import re
from pathlib import Path


def test_the_readme_example_runs():
    text = (Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"## Use\n\n```python\n(.*?)```", text, re.S)
    assert block, "the README has no python block under '## Use'"
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert namespace["stats"].norm.item() > 0
