"""benchmarks/step_parts.py: MAN++'s step taken apart, on a small real backbone."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import step_parts  # noqa: E402


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("objective", ["infopro", "dgl"])
def test_the_parts_cover_the_step_and_their_excesses_add_up(tmp_path, threads, objective):
    k = 4
    assert step_parts.main(["--model", "resnet8", "--k", str(k), "--batch-size", "8", "--steps", "1", "--repeats", "1",
                            "--objective", objective, "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "step_parts.json").read_text())
    rows = {(r["part"], r["sub"]): r for r in doc["rows"]}
    # one backbone call per module, one of each auxiliary part per module with an auxiliary network
    assert rows[("backbone", "")]["calls"] == k
    assert all(rows[(p, "")]["calls"] == k - 1 for p in ("learnable copy", "EMA copy", "head"))
    assert (("head", "decoder") in rows) == (objective == "infopro")
    # the backbone's parts do E2E's arithmetic exactly, and each copy of a unit does work
    assert rows[("backbone", "")]["flops"] == doc["e2e"]["flops"] > 0
    assert rows[("learnable copy", "")]["flops"] > 0 and rows[("EMA copy", "")]["flops"] > 0
    whole = [r for r in doc["rows"] if not r["sub"]]
    assert sum(r["flops"] for r in whole) == doc["manpp"]["flops"]
    assert doc["flop_ratio"] == pytest.approx(doc["manpp"]["flops"] / doc["e2e"]["flops"])
    # the parts' excesses split MAN++'s time beyond E2E's step times the FLOP ratio, nothing left over
    assert sum(r["excess_s"] for r in whole) == pytest.approx(doc["excess_s"], abs=1e-9)
    assert doc["excess_s"] == pytest.approx(doc["manpp"]["seconds"] - doc["flop_ratio"] * doc["e2e"]["seconds"])
    assert rows[("backbone", "")]["excess_s"] == pytest.approx(0.0, abs=1e-12)
    assert "| &nbsp;&nbsp;of which decoder |" in (tmp_path / "step_parts.md").read_text() or objective != "infopro"


def test_a_count_below_one_is_refused(capsys):
    with pytest.raises(SystemExit):
        step_parts.main(["--repeats", "0"])
    assert "--repeats must be at least 1, got 0" in capsys.readouterr().err


def test_a_method_without_momentum_auxiliary_networks_is_refused(threads):
    from manpp.core.engine import LocalContext

    class Plain(torch.nn.Module):
        k = 2
        local_modules = [torch.nn.Identity(), torch.nn.Identity()]
        aux = [torch.nn.Identity()]

    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(SystemExit, match="not MAN/MAN"):
        step_parts.part_calls(Plain(), x, LocalContext(x, torch.zeros(1, dtype=torch.long), None))


@pytest.mark.slow
def test_compiled_steps_are_timed_beside_the_eager_ones(tmp_path, threads):
    assert step_parts.main(["--model", "resnet8", "--k", "2", "--batch-size", "8", "--steps", "1", "--repeats", "1",
                            "--compile", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "step_parts.json").read_text())
    for name in ("e2e", "manpp"):
        c = doc["compiled"][name]
        assert c["compile_s"] > 0 and len(c["times_s"]) == 1 and c["seconds"] > 0
    assert doc["rows"][0]["flops"] == doc["e2e"]["flops"]  # the parts are the eager modules' arithmetic
    assert "**`torch.compile`**" in (tmp_path / "step_parts.md").read_text()
