"""Write finetune/backbones/block_names.json: every built-in backbone's block names, read from the built network.

    python3 scripts/block_names_table.py

Run it after adding a built-in backbone or changing a block pattern; tests/test_validate.py checks the table.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.backbones import block_names
from finetune.backbones.registry import backbones


def main() -> None:
    table = {}
    for name in sorted(backbones.names()):
        if name in ("run", "mlp"):  # a run's blocks are its own; the mlp's follow its options
            continue
        table[name] = block_names.built(backbones.entry(name))
        print(f"{name}: {len(table[name])} blocks", flush=True)
    block_names.TABLE_FILE.write_text(json.dumps(table, indent=1) + "\n")


if __name__ == "__main__":
    main()
