"""What a pip install gets: presets inside the package, py.typed, LICENSE, one version; the help."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import manpp
from manpp.config import trainconfig as C
from manpp.commands.cli import build_parser, main
from manpp.base.errors import ManppError
from manpp.config.presets import preset_names

ROOT = Path(__file__).resolve().parent.parent


def test_presets_ship_inside_the_package_and_load_by_bare_name(capsys):
    names = preset_names()
    assert len(names) == len(list((ROOT / "src" / "manpp" / "configs").glob("*.yaml"))) >= 20
    assert "cifar10_resnet32_k16_infopro_manpp" in names
    data = C.load_yaml("cifar10_resnet32_k16_infopro_manpp")
    assert data["model"] == "resnet32" and data["k"] == 16
    with pytest.raises(ManppError, match="neither a file nor a preset: the presets are cifar10_"):
        C.load_yaml("cifar10_resnet32_k17")
    for argv in (["--preset", "cifar10_resnet32_k8_dgl_manpp"], ["-c", "cifar10_resnet32_k8_dgl_manpp"]):
        assert main(["describe", *argv, "--dataset", "digits", "--batch-size", "2", "--json"]) == 0
        assert '"modules"' in capsys.readouterr().out
    assert main(["describe", "--preset", "nope"]) == 2
    assert "unknown preset 'nope': accepted are" in capsys.readouterr().err


def test_train_help_shows_defaults_choices_examples_and_every_model(capsys):
    from manpp.models import model_names

    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in model_names():
        assert name in text, name
    for needle in ("examples:", "manpp train --resume", "--epochs EPOCHS default 8", "default digits", "{bf16,fp16}",
                   "cifar10_resnet32_k16_infopro_manpp", "--overwrite"):
        assert needle in text, needle


@pytest.mark.slow
def test_the_wheel_holds_presets_py_typed_license_and_the_version(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("manpp-*.whl"))
    assert wheel.name.startswith(f"manpp-{manpp.__version__}-")
    names = zipfile.ZipFile(wheel).namelist()
    assert "manpp/py.typed" in names
    assert sum(n.startswith("manpp/configs/") and n.endswith(".yaml") for n in names) == len(preset_names())
    assert any(n.endswith("licenses/LICENSE") for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    assert "License-Expression: MIT" in metadata and f"Version: {manpp.__version__}" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    core = [line for line in requires if "extra ==" not in line]
    assert sorted(line.split()[1].split(">")[0].lower() for line in core) == [
        "numpy", "pyyaml", "torch", "torchvision", "tqdm"]
    assert any("scikit-learn" in line and 'extra == "digits"' in line for line in requires)
    sources = {str(p.relative_to(ROOT / "src")) for p in (ROOT / "src" / "manpp").rglob("*.py")}
    assert sources <= set(names), sorted(sources - set(names))  # every layer's package is found and shipped
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "manpp = manpp.commands.cli:main" in entry_points


def test_citation_names_the_paper_and_the_toolkit():
    import yaml

    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["version"] == manpp.__version__
    assert "MAN++" in cff["preferred-citation"]["title"] and "2507.16279" in str(cff["preferred-citation"])


def test_docs_reference_only_files_in_the_repository():
    import re

    texts = {p: p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
    for path, text in texts.items():
        assert "METHOD.md" not in text and "RELEASE.md" not in text, path
        prose = re.sub(r"`[^`\n]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))  # links live outside code
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", prose):
            if "://" in target:
                continue
            assert (path.parent / target).exists(), f"{path.name} links to missing {target}"


def test_compare_plot_has_a_time_panel(tmp_path):
    pytest.importorskip("matplotlib")
    from manpp.commands import compare

    records = [{"method": m, "modules": k, "history": [{"epoch": 1, "test_score": 0.5, "complete": 1}],
                "metric": "accuracy", "model": "resnet8", "dataset": "digits", "peak_activation_bytes": b,
                "batch_size": 16, "epoch_time_s": t, "device": "cpu"}
               for m, k, b, t in (("e2e", 1, 2**20, 1.0), ("manpp", 4, 2**19, 3.0))]
    figure = compare.compare_figure(records)
    titles = [ax.get_title() for ax in figure.axes]
    assert len(titles) == 3 and "time per epoch" in titles[2]
    bars = [patch.get_height() for patch in figure.axes[2].patches]
    assert bars == [1.0, 3.0]
