"""The README's key table states the defaults the code uses."""

import re
from pathlib import Path

from tpo_plugin.hparams.tpo_args import tpo_defaults


def test_readme_key_table_matches_defaults():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    rows = re.findall(r"^\| `(tpo_\w+)` \| [^|]+ \| `?([^|`]+?)`? \|", readme, flags=re.MULTILINE)
    documented = {key: default.strip() for key, default in rows}
    assert set(documented) == set(tpo_defaults())
    for key, default in tpo_defaults().items():
        assert documented[key] == (str(default).lower() if isinstance(default, bool) else str(default)), key
