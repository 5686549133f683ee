"""glue.py reads in the order a user needs it, --help groups the flags, the README shows the
code as it is."""

import ast
import os
import re
import subprocess
import sys

import glue
from conftest import REPO

BANNER = "# Nothing below needs editing to bring your own model"


def glue_source():
    with open(os.path.join(REPO, "glue.py"), encoding="utf-8") as file:
        return file.read()


def test_every_flag_is_in_exactly_one_help_group():
    grouped = [name for names in glue.HELP_GROUPS.values() for name in names]
    own = [flag.name for flag in glue.FLAGS.get_key_flags_for_module(glue)]
    assert sorted(grouped) == sorted(own)
    assert len(grouped) == len(set(grouped))


def test_help_shows_the_groups_in_order():
    result = subprocess.run([sys.executable, os.path.join(REPO, "glue.py"), "--help"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    titles = [line[:-1] for line in result.stdout.splitlines() if line.endswith(":") and
              not line.startswith(" ")]
    assert titles == list(glue.HELP_GROUPS)
    flags_shown = re.findall(r"^  --(\w+):", result.stdout, re.MULTILINE)
    assert flags_shown == [name for names in glue.HELP_GROUPS.values() for name in names]
    assert "python glue.py --task_name=mrpc" in result.stdout  # the usage line


def test_readme_shows_block_3_as_the_code_reads():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as file:
        readme = file.read()
    snippet = readme.split("3. **`make_finetuning_model")[1].split("```python")[1].split("```")[0]
    code = glue_source()
    for line in filter(None, (line.strip() for line in snippet.splitlines())):
        assert line in code, line
