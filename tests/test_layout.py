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


def test_a_reader_who_stops_at_the_banner_has_seen_the_whole_flow():
    source = glue_source()
    lines = source.splitlines()
    assert lines.count(BANNER) == 1  # a comment line of its own
    banner = lines.index(BANNER)
    defined = {node.name: node.lineno for node in ast.parse(source).body
               if isinstance(node, (ast.FunctionDef, ast.ClassDef))}
    flow = ["make_preprocess_fn", "load_pretrained_model", "make_finetuning_model",
            "GlueClassifier", "sentence_encoder", "load_task_data", "tokenize", "train",
            "predict", "evaluate", "write_submission", "main", "run_task"]
    plumbing = ["make_strategy", "patch_keras_for_multi_worker", "TrainingCheckpoints",
                "validate_submission", "make_submission_zip", "updating_results", "check_options"]
    assert all(defined[name] < banner for name in flow)
    assert all(defined[name] > banner for name in plumbing)
    # The custom code blocks come right after the flags, before the task table.
    first_block = lines.index("### Custom code block starts ###")
    assert first_block < defined["GlueTask"] < defined["load_task_data"] < defined["train"]
