"""meshlm.plan is a pure model: importing it loads neither torch nor the engine, the server or meshlm.LLM."""

from __future__ import annotations

import json
import subprocess
import sys

MODULES = ("cluster", "layout", "memory", "cost", "search", "report", "cli", "weights")


def test_plan_imports_no_torch_and_no_engine():
    """A fresh interpreter imports every plan module; torch, engine/, serve/ and meshlm.llm stay unloaded."""
    code = ("import json, sys\n"
            + "".join(f"import meshlm.plan.{m}\n" for m in MODULES)
            + "print(json.dumps(sorted(m for m in sys.modules if m == 'torch' or m.startswith(("
              "'torch.', 'meshlm.engine', 'meshlm.serve', 'meshlm.llm')))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []


def test_the_stage_split_is_the_loaders():
    """plan sizes stages with the very functions parallel/pipeline.py and styles.py export."""
    from meshlm.parallel import partition, pipeline, styles

    assert pipeline.plan_stages is partition.plan_stages and styles.head_partition is partition.head_partition
