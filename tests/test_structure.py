"""Performance by structure, not by the clock: what the fast paths import and what they read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT, write_random_source

PROBE = r"""
import sys
from mpt_tools.cli import cli
try:
    cli.main(sys.argv[1:], prog_name="mpt-tools")
except SystemExit as exc:
    code = exc.code
print("MODULES", " ".join(m for m in ("torch", "huggingface_hub", "peft", "transformers") if m in sys.modules))
"""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["inspect", "{src}"],
        ["validate", "{src}"],
        ["init", "{src}", "--mode", "exact", "--task", "1", "--out", "{out}/e"],
        ["init", "{src}", "--mode", "shared", "--seed", "1", "--out", "{out}/s"],
        ["validate", "{src}", "--against", "{src}", "--mode", "exact"],
    ],
    ids=lambda a: " ".join(a[:3]),
)
def test_fast_paths_never_import_torch_or_hub(tmp_path: Path, argv: list[str]) -> None:
    args = [a.format(src=FIXTURES / "causal", out=tmp_path) for a in argv]
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    line = next(x for x in proc.stdout.splitlines() if x.startswith("MODULES"))
    assert line.split()[1:] == [], f"{argv[0]} imported {line.split()[1:]}"


@pytest.mark.parametrize(
    "extra",
    [[], ["--tasks", "0,2"], ["--tasks", "2,0", "--weights", "1,3"], ["--target-tasks", "3"], ["--torch-threads", "8"]],
    ids=lambda a: " ".join(a) or "plain",
)
def test_average_needs_no_torch(tmp_path: Path, extra: list[str]) -> None:
    """init --mode average computes torch's mean in numpy (mpt_tools.torchmean), bit for bit."""
    args = ["init", str(FIXTURES / "causal"), "--mode", "average", *extra, "--out", str(tmp_path / "a")]
    proc = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("MODULES", 1)[1].split() == []
    torch_args = [*args[:-1], str(tmp_path / "t"), "--engine", "torch"]
    proc = subprocess.run([sys.executable, "-c", PROBE, *torch_args], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "torch" in proc.stdout.split("MODULES", 1)[1].split()
    written = [(tmp_path / d / "adapter_model.safetensors").read_bytes() for d in ("a", "t")]
    assert written[0] == written[1]


def make_big(tmp: Path, n: int = 40, t: int = 6, r: int = 3, d: int = 32) -> Path:
    return write_random_source(tmp / "big.safetensors", n, t, r, d)


def test_exact_reads_only_task_k(tmp_path: Path) -> None:
    from mpt_tools.checkpoint import load_source
    from mpt_tools.init import init_adapter
    from mpt_tools.modes import TargetPlan
    from mpt_tools.options import ConfigOverrides, SourceSpec

    ckpt = load_source(SourceSpec(str(make_big(tmp_path)), overrides=ConfigOverrides(task_type="CAUSAL_LM")))
    init_adapter(ckpt, TargetPlan("exact", task=7), tmp_path / "out")
    reads = sorted(ckpt.file.reads)
    assert reads == sorted(
        [
            ("prompt_embeddings", 0, 6, 6 * 32 * 4),
            ("prefix_task_cols", 7, 8, 6 * 3 * 4),
            ("prefix_task_rows", 7, 8, 3 * 32 * 4),
        ]
    )
    out_size = (tmp_path / "out" / "adapter_model.safetensors").stat().st_size
    assert sum(r[3] for r in reads) <= 2 * out_size


def test_validate_and_inspect_stream_in_bounded_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mpt_tools import checks, inspection, prompts
    from mpt_tools.checkpoint import load_source

    limit = 1000  # bytes: a few tasks at a time
    monkeypatch.setattr(prompts, "CHUNK_BYTES", limit)
    ckpt = load_source(make_big(tmp_path))
    findings = checks.value_findings(ckpt, chunk_bytes=limit)
    assert not findings
    factor_reads = [r for r in ckpt.file.reads if r[0] != "prompt_embeddings"]
    assert len(factor_reads) > 2
    assert all(r[3] <= limit for r in factor_reads)
    covered = {(r[0], t) for r in factor_reads for t in range(r[1], r[2])}
    assert len(covered) == 2 * 40  # every task of both factors, once
    ckpt.file.reads.clear()
    norms = inspection.task_norms(ckpt, chunk_bytes=limit)
    assert len(norms) == 40
    steps = [r[2] - r[1] for r in ckpt.file.reads if r[0] == "prefix_task_rows"]
    assert max(steps) * 6 * 32 * 8 <= limit or max(steps) == 1


def test_cli_dtype_choices_match_the_library() -> None:
    """Every command's --dtype takes the library's names and aliases (bf16, fp16, half,
    torch.bfloat16, any case), as the library does, and refuses anything else as a usage error."""
    import click

    from mpt_tools.cli import cli
    from mpt_tools.cli.options import TRAINING_DTYPES
    from mpt_tools.formats import DTYPE_CHOICES, canonical_dtype

    assert list(DTYPE_CHOICES) == TRAINING_DTYPES
    commands = {name: cmd for name, cmd in cli.commands.items() if any(p.name == "dtype" for p in cmd.params)}
    assert {"convert", "export", "pack", "verify"} <= set(commands)
    for cmd in commands.values():
        param = next(p for p in cmd.params if p.name == "dtype")
        for text in ("float32", "bf16", "BF16", "fp16", "half", "torch.bfloat16", "FP32", "bfloat16"):
            assert param.type.convert(text, param, None) == canonical_dtype(text) in TRAINING_DTYPES
        with pytest.raises(click.BadParameter):
            param.type.convert("int8", param, None)


def test_convert_takes_a_dtype_alias(tmp_path: Path) -> None:
    """``--dtype bf16`` on the command line writes bfloat16, as ``--dtype bfloat16`` does."""
    from conftest import run_cli

    from mpt_tools.checkpoint import load_source

    src = write_random_source(tmp_path / "src.safetensors", 2, 4, 1, 8)
    for text, out in (("bf16", "a"), ("bfloat16", "b")):
        result = run_cli("convert", str(src), "--out", str(tmp_path / out), "--dtype", text)
        assert result.exit_code == 0, result.output
    a, b = (tmp_path / "a" / "adapter_model.safetensors"), (tmp_path / "b" / "adapter_model.safetensors")
    assert a.read_bytes() == b.read_bytes()
    assert load_source(tmp_path / "a").info("prefix_task_cols").dtype == "BF16"
