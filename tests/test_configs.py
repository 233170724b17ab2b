"""Experiment configs: importable by name, loadable by train's --config, no unread field.

"Every setting has one owner": a config field that no code reads is a setting
that silently does nothing. ``test_every_config_field_is_read`` checks, for
each leaf field of each experiment config, that some module of
``maskrcnn_jax/`` reads a field of that name. The check is textual (Python
tokens, so comments do not count): a read is ``.name`` not being assigned
to, or the string literal ``"name"`` (``config["name"]``, ``.get("name")``).
The modules that only declare the fields (``data/config.py``,
``modeling/config.py``) are left out. Being textual, the check cannot tell a
field read only on a path nobody takes (``dataset.train_batch_size`` was read
as a default that training always overrode) or one that passes because
another field of the same name is read; it catches fields no code reads at
all, such as a field left behind when its reader is deleted.
"""

from __future__ import annotations

import importlib
import io
import os
import pkgutil
import subprocess
import sys
import tokenize
from collections.abc import Iterator

import ml_collections
import pytest

import experiments
from experiments.base import get_base_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "maskrcnn_jax")
# Modules that declare config fields (defaults, validation) rather than use them.
DECLARING = {os.path.join("data", "config.py"), os.path.join("modeling", "config.py")}
# Modules of experiments/ that are not configs: shared fields, and scripts that run configs.
NOT_CONFIGS = {"base", "ablations"}
CONFIG_NAMES = sorted(
    m.name
    for m in pkgutil.iter_modules(experiments.__path__)
    if m.name not in NOT_CONFIGS and not m.name.startswith("bench_")
)


def test_experiments_are_a_package_of_configs():
    assert CONFIG_NAMES == ["coco_r50_fpn_1x", "shapes", "tiny"]
    for name in os.listdir(os.path.dirname(experiments.__file__)):
        if name.endswith(".py"):
            with open(os.path.join(os.path.dirname(experiments.__file__), name)) as f:
                assert "sys.path" not in f.read(), f"{name} edits sys.path"


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_config_imports_by_name(name):
    config = importlib.import_module(f"experiments.{name}").get_config()
    assert isinstance(config, ml_collections.ConfigDict)
    assert set(get_base_config()) <= set(config)


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> Iterator[str]:
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _names_read() -> set[str]:
    """Attribute names read (``.x`` not followed by ``=``) and string literals in the package."""
    read: set[str] = set()
    for folder, _, files in os.walk(PACKAGE):
        for file in files:
            path = os.path.join(folder, file)
            if not file.endswith(".py") or os.path.relpath(path, PACKAGE) in DECLARING:
                continue
            with open(path, encoding="utf-8") as f:
                tokens = [
                    t
                    for t in tokenize.generate_tokens(io.StringIO(f.read()).readline)
                    if t.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE)
                ]
            for i, token in enumerate(tokens):
                if token.type == tokenize.STRING:
                    literal = token.string.strip("\"'")
                    if literal.isidentifier():
                        read.add(literal)
                elif (
                    token.type == tokenize.NAME
                    and i > 0
                    and tokens[i - 1].string == "."
                    and not (i + 1 < len(tokens) and tokens[i + 1].string == "=")
                ):
                    read.add(token.string)
    return read


def test_every_config_field_is_read():
    read = _names_read()
    configs = {"base": get_base_config()}
    configs.update(
        {n: importlib.import_module(f"experiments.{n}").get_config() for n in CONFIG_NAMES}
    )
    unread = sorted(
        {
            f"{name}: {path}"
            for name, config in configs.items()
            for path in _leaves(config)
            if path.rsplit(".", 1)[-1] not in read
        }
    )
    assert not unread, "config fields no code in maskrcnn_jax/ reads:\n" + "\n".join(unread)


def test_the_check_finds_an_unread_field():
    """The check can fail: a field nobody reads is reported."""
    read = _names_read()
    assert "batch_size" in read and "num_workers" in read
    assert "train_batch_size" not in read and "eval_scale" not in read


def test_train_loads_a_config_file_from_another_directory(tmp_path):
    """``--config experiments/shapes.py`` as train parses it, run outside the repository.

    ``experiments`` must be importable there: through the editable install
    (pyproject lists the package) or, in a checkout without one, PYTHONPATH.
    """
    code = (
        "import sys\n"
        "from absl import flags\n"
        "from ml_collections import config_flags\n"
        "values = flags.FlagValues()\n"
        "config_flags.DEFINE_config_file('config', None, '', flag_values=values)\n"
        # As `python -m maskrcnn_jax.train --config ... --config.train.steps=3` sees it
        # (config_flags reads the overrides from sys.argv).
        "sys.argv = ['train', '--config', sys.argv[1], '--config.train.steps=3']\n"
        "values(sys.argv)\n"
        "print(values.config.train.steps, values.config.dataset.name)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, os.path.join(ROOT, "experiments", "shapes.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["3", "shapes"]
