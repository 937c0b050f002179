"""Write mpt_tools/peft_fields.json: the config fields of PEFT's prompt-tuning configs, per release.

Each release's table is read from that release's own classes, imported in a Python environment
that has that release installed: ``dataclasses.fields`` of ``MultitaskPromptTuningConfig`` and
``PromptTuningConfig`` (their bases included: ``PromptLearningConfig``, ``PeftConfig``,
``PeftConfigMixin``), the fields ``__init__`` takes, with their defaults (an enum default as its
value, a ``default_factory`` called). Nothing is typed in by hand.

Usage::

    # one environment per release, OLD here (.ci/run pins PEFT 0.10.0 and the transformers of its era):
    python3 -m venv OLD && OLD/bin/pip install torch==2.13.0 peft==0.10.0 transformers==4.39.3
    python docs/make_peft_fields.py --python OLD/bin/python --python .venv/bin/python

    # other releases that import with an environment's transformers: peft alone (no dependencies)
    # is installed into a cache folder and put first on that interpreter's path
    python docs/make_peft_fields.py --python OLD/bin/python=0.11.1,0.12.0,0.13.2

    python docs/make_peft_fields.py --check       # the table's entry for the PEFT of this Python
    python docs/make_peft_fields.py --dump        # print this Python's PEFT's fields as JSON

Releases already in the table are kept (the script adds or refreshes those it reads), so the
table can be grown one environment at a time. ``tests/test_peft_compat.py`` checks that the
table's entry for the PEFT the tests install equals what that PEFT's classes say.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TABLE = ROOT / "mpt_tools" / "peft_fields.json"
CLASSES = ("MultitaskPromptTuningConfig", "PromptTuningConfig")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mpt-tools" / "peft-releases"
REQUIRED = "<required>"  # a field without a default (none so far)


def dump() -> dict[str, Any]:
    """The fields of this interpreter's PEFT: ``{"version", "classes": {class: {field: default}}}``."""
    import dataclasses
    import enum

    import peft

    def default(f: Any) -> Any:
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            return REQUIRED
        if isinstance(value, enum.Enum):
            value = value.value
        if isinstance(value, (set, frozenset, tuple)):
            value = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
        json.dumps(value)  # must be JSON (it is compared with adapter_config.json values)
        return value

    classes = {}
    for name in CLASSES:
        cls = getattr(peft, name)
        classes[name] = {f.name: default(f) for f in dataclasses.fields(cls) if f.init}
    return {"version": peft.__version__, "classes": classes}


def release_key(version: str) -> tuple[int, ...]:
    """A release's sort key: "0.13.2" -> (0, 13, 2)."""
    return tuple(int(p) for p in version.split("."))


def run_dump(python: str, peft_version: str | None) -> dict[str, Any]:
    """Run :func:`dump` under ``python``; with ``peft_version``, first install that PEFT release
    alone (``pip install --no-deps --target``) into a cache folder put first on its path."""
    env = dict(os.environ, PYTHONNOUSERSITE="1")
    env.pop("PYTHONPATH", None)
    if peft_version is not None:
        target = CACHE / peft_version
        if not (target / "peft").is_dir():
            cmd = [python, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), f"peft=={peft_version}"]
            subprocess.run(cmd, check=True)
        env["PYTHONPATH"] = str(target)
    out = subprocess.run([python, __file__, "--dump"], check=True, capture_output=True, text=True, env=env)
    data = json.loads(out.stdout)
    if peft_version is not None and data["version"] != peft_version:
        raise SystemExit(f"{python} imported peft {data['version']}, not {peft_version}")
    return data


def read_table() -> dict[str, Any]:
    """The table as it is now (empty when there is none)."""
    if TABLE.is_file():
        return json.loads(TABLE.read_text())
    return {"releases": {}}


def write_table(releases: dict[str, Any]) -> None:
    """Write the table, releases oldest first."""
    ordered = {v: releases[v] for v in sorted(releases, key=release_key)}
    table = {
        "about": (
            "Config fields (with defaults) of PEFT's MultitaskPromptTuningConfig and PromptTuningConfig in "
            "each PEFT release, read from that release's own classes by docs/make_peft_fields.py. "
            "Do not edit by hand."
        ),
        "releases": ordered,
    }
    TABLE.write_text(json.dumps(table, indent=1, sort_keys=False) + "\n")


def main(argv: list[str] | None = None) -> int:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", action="store_true", help="print this Python's PEFT's fields as JSON")
    parser.add_argument("--check", action="store_true", help="compare the table with this Python's PEFT")
    parser.add_argument(
        "--python",
        action="append",
        default=[],
        metavar="PY[=V1,V2]",
        help="an interpreter with PEFT installed; =V1,V2 reads those releases with that interpreter",
    )
    args = parser.parse_args(argv)
    if args.dump:
        print(json.dumps(dump()))
        return 0
    if args.check:
        here = dump()
        entry = read_table()["releases"].get(here["version"])
        if entry != here["classes"]:
            print(f"mpt_tools/peft_fields.json does not match peft {here['version']}: run this script", file=sys.stderr)
            return 1
        print(f"peft {here['version']}: the table matches")
        return 0
    if not args.python:
        parser.error("give --python (or --dump / --check)")
    releases = dict(read_table()["releases"])
    for spec in args.python:
        python, _, versions = spec.partition("=")
        for version in versions.split(",") if versions else [None]:
            data = run_dump(python, version)
            releases[data["version"]] = data["classes"]
            print(f"peft {data['version']}: {', '.join(f'{k} {len(v)} fields' for k, v in data['classes'].items())}")
    write_table(releases)
    print(f"wrote {TABLE.relative_to(ROOT)} ({len(releases)} releases)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
