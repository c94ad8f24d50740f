"""Specification of the command line as a user meets it: the installed `mvi-node` console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom

ROOT = Path(__file__).resolve().parents[3]


def mvi_node(
    *args: str | Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the installed console script as an operator would (no TTY: JSON log lines)."""
    script = shutil.which("mvi-node", path=str(Path(sys.executable).parent)) or "mvi-node"
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("MVI_")}
    return subprocess.run(
        [script, *map(str, args)],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=600,
        check=False,
    )


def test_version() -> None:
    result = mvi_node("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("mvi-node ")


def test_config_check_prints_the_effective_configuration() -> None:
    result = mvi_node("config", "check", ROOT / "config" / "example-site.toml")
    assert result.returncode == 0, result.stderr
    assert "[peers.pacs]" in result.stdout
    assert 'ae_title = "HOSP_PACS"' in result.stdout


def test_config_check_redacts_secrets(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text("[node]\nport = 11113\n")
    result = mvi_node(
        "config", "check", path, env={"MVI_SECURITY__PSEUDONYM_KEY": "topsecret-" + "k" * 32}
    )
    assert result.returncode == 0, result.stderr
    assert "topsecret" not in result.stdout
    assert "port = 11113" in result.stdout


def test_config_check_names_each_bad_key_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    path.write_text(
        '[node]\nprot = 104\nport = 99999\nmax_associations = "ten"\n'
        '[results]\ndestinations = ["archive"]\n'
    )
    result = mvi_node("config", "check", path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 4
    assert all(line.startswith(f"{path}: ") for line in lines)
    text = result.stderr
    assert "node.prot = 104: unknown key" in text
    assert "node.port = 99999" in text
    assert "node.max_associations = 'ten'" in text
    assert "results.destinations[0] = 'archive'" in text


def test_config_check_of_a_missing_file(tmp_path: Path) -> None:
    result = mvi_node("config", "check", tmp_path / "nope.toml")
    assert result.returncode == 2
    assert "file not found" in result.stderr


def test_phantom_writes_a_cohort_and_logs_no_patient_identifiers(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    result = mvi_node(
        "phantom", out, "--studies", "2", "--seed", "5", "--size", "64", "--slices", "16"
    )
    assert result.returncode == 0, result.stderr
    assert (out / "labels.csv").is_file() and (out / "truth.csv").is_file()
    records = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [r["event"] for r in records].count("study written") == 2
    identifiers = set()
    for path in out.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        identifiers |= {
            str(ds.PatientName),
            str(ds.PatientName).split("^")[0],
            str(ds.PatientID),
            str(ds.AccessionNumber),
            str(ds.PatientBirthDate),
            str(ds.StudyInstanceUID),
        }
    log = result.stderr + result.stdout
    for identifier in identifiers:
        assert identifier not in log, f"{identifier!r} reached the output"


def test_phantom_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = mvi_node("phantom", tmp_path, "--size", "64", "--slices", "16")
    assert result.returncode == 2
    assert "not empty" in result.stderr and "--force" in result.stderr
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / "truth.csv").exists()


def test_phantom_force_replaces_a_previous_cohort_only(tmp_path: Path) -> None:
    args = ("--size", "64", "--slices", "16", "--seed", "1")
    assert mvi_node("phantom", tmp_path, "--studies", "2", *args).returncode == 0
    (tmp_path / "notes.txt").write_text("mine")
    result = mvi_node("phantom", tmp_path, "--studies", "1", "--force", *args)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.glob("study_*")) == ["study_0001"]
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_phantom_rejects_bad_options(tmp_path: Path) -> None:
    bad_phase = mvi_node("phantom", tmp_path / "a", "--phases", "venous")
    assert bad_phase.returncode == 2 and "unknown phase" in bad_phase.stderr
    bad_dates = mvi_node("phantom", tmp_path / "b", "--dates", "2020-01-01")
    assert bad_dates.returncode == 2 and "FROM:TO" in bad_dates.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_inspect_loads_every_series(tmp_path: Path) -> None:
    out = tmp_path / "cohort"
    assert mvi_node("phantom", out, "--size", "64", "--slices", "16").returncode == 0
    result = mvi_node("inspect", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("64×64×16") == 4  # the four phases
    assert "error" not in result.stdout


def test_inspect_of_a_folder_without_dicom(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    result = mvi_node("inspect", tmp_path)
    assert result.returncode == 1
    assert "no DICOM files" in result.stderr


def test_convert_weights_to_safetensors(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file
    from torchvision.models import resnet18

    state = resnet18(weights=None).state_dict()
    source = tmp_path / "resnet18.pth"
    torch.save(state, source)  # what torchvision ships; the node only ever reads it weights-only
    target = tmp_path / "resnet18.safetensors"
    result = mvi_node("convert-weights", source, target)
    assert result.returncode == 0, result.stderr
    loaded = load_file(str(target))
    assert torch.equal(loaded["conv1.weight"], state["conv1.weight"])
    again = mvi_node("convert-weights", source, target)
    assert again.returncode == 2 and "exists" in again.stderr


def test_convert_weights_refuses_a_pickled_object(tmp_path: Path) -> None:
    import collections

    import torch

    source = tmp_path / "evil.pth"
    torch.save(collections.Counter(a=1), source)  # not tensors: refused by weights_only
    result = mvi_node("convert-weights", source, tmp_path / "out.safetensors")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.safetensors").exists()


def test_help_texts_keep_their_brackets() -> None:
    shown = mvi_node("echo", "--help")
    assert shown.returncode == 0
    assert "[peers.NAME]" in shown.stdout
