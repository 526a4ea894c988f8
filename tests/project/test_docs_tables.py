"""tools/docs_tables.py: the docs' tables of figures are what the code gives, and --check catches a changed number."""

import os
import shutil
import subprocess
import sys

import pytest

from train_utils import REPO

TOOL = os.path.join(REPO, "tools", "docs_tables.py")
sys.path.insert(0, os.path.join(REPO, "tools"))
import docs_tables  # noqa: E402


def _check(root: str, capsys) -> tuple:
    """``python tools/docs_tables.py --check --root ROOT`` in this process: (exit status, stderr lines)."""
    status = docs_tables.main(["--check", "--root", root])
    return status, capsys.readouterr().err.splitlines()


@pytest.fixture(scope="module")
def docs_copy(tmp_path_factory):
    """README.md and docs/ copied to a temporary root (the tool reads the docs from --root, the code from REPO)."""
    root = tmp_path_factory.mktemp("docs_root")
    shutil.copytree(os.path.join(REPO, "docs"), root / "docs")
    shutil.copy(os.path.join(REPO, "README.md"), root / "README.md")
    return root


def test_docs_tables_are_up_to_date():
    """As CI runs it (scripts/test.sh): the command exits 0 on the checkout."""
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, TOOL, "--check"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize(
    "doc, table, old, new",
    [
        ("docs/parallel.md", "memory", "| 62.3 GiB |", "| 63.2 GiB |"),  # 104B shipped, total per GPU
        ("docs/parallel.md", "activations", "3 b N F / T", "4 b N F / T"),
        ("docs/parallel.md", "ranks", "| 5 | 1 | 0 | 1 |", "| 5 | 1 | 1 | 1 |"),
    ],
)
def test_check_fails_naming_the_doc_and_table_after_a_number_changes(docs_copy, tmp_path, capsys, doc, table, old, new):
    root = tmp_path / "root"
    shutil.copytree(docs_copy, root)
    path = root / doc
    text = path.read_text()
    assert old in text, (doc, old)
    path.write_text(text.replace(old, new, 1))
    assert _check(str(root), capsys) == (
        1,
        [f"{doc}: table {table!r} differs from the code; run python tools/docs_tables.py"],
    )


def test_check_fails_when_a_measured_table_loses_its_machine_and_date(docs_copy, tmp_path, capsys):
    root = tmp_path / "root"
    shutil.copytree(docs_copy, root)
    path = root / "docs" / "checkpoint.md"
    text = path.read_text()
    note = "Measured by `python tools/docs_tables.py --measure checkpoint-bytes` on "
    assert note in text
    path.write_text(text.replace(note, "Measured on "))
    status, lines = _check(str(root), capsys)
    assert status == 1 and lines == [
        "docs/checkpoint.md: measured table 'checkpoint-bytes' is missing or does not name its machine and date"
    ]
