"""The result cache trusts nothing it did not write: damaged, foreign or edited cells and
damaged artefacts are recomputed, never used."""

from __future__ import annotations

import json

import pytest
import torch

from medsec.cache import ArtifactStore, cached_cell


def test_cell_is_computed_once_then_reused(tmp_path):
    path, calls = tmp_path / "c.json", []
    compute = lambda: calls.append(1) or {"asr": 1.0, "success": [True, True]}  # noqa: E731
    assert cached_cell(path, {"k": 1}, compute) == ({"asr": 1.0, "success": [True, True]}, True)
    assert cached_cell(path, {"k": 1}, compute) == ({"asr": 1.0, "success": [True, True]}, False)
    assert len(calls) == 1
    assert cached_cell(path, {"k": 2}, compute)[1]  # another key: recomputed
    assert len(calls) == 2


@pytest.mark.parametrize(
    "damage,why",
    [
        (lambda p: p.write_text("[]"), "not a medsec cell"),
        (lambda p: p.write_bytes(b"\xff\xfe\x00garbage"), "not readable JSON"),
        (lambda p: p.write_text(p.read_text()[:20]), "not readable JSON"),
        (
            lambda p: p.write_text(p.read_text().replace('"asr": 1.0', '"asr": 0.123')),
            "does not match its digest",
        ),
    ],
)
def test_damaged_or_edited_cell_is_recomputed(tmp_path, damage, why):
    path, warnings = tmp_path / "c.json", []
    cached_cell(path, {"k": 1}, lambda: {"asr": 1.0})
    damage(path)
    result, computed = cached_cell(path, {"k": 1}, lambda: {"asr": 1.0}, warn=warnings.append)
    assert computed and result == {"asr": 1.0}
    assert len(warnings) == 1 and why in warnings[0]
    assert json.loads(path.read_text())["result"] == {"asr": 1.0}  # repaired on disk


def test_damaged_artefacts_are_remade(tmp_path):
    store = ArtifactStore(tmp_path, "tag")
    made = []

    def make():
        made.append(1)
        return {"x_adv": torch.ones(3)}

    store.tensors("adv", make)
    path = next(tmp_path.rglob("adv.pt"))
    path.write_bytes(path.read_bytes()[:10])  # truncated
    assert torch.equal(store.tensors("adv", make)["x_adv"], torch.ones(3)) and len(made) == 2
    model = torch.nn.Linear(2, 1)
    rec = store.trained("lin", model, lambda: {"steps": 1})
    assert rec["cached"] is False and rec["artifact"] == "lin-tag.pt"
    (tmp_path / "lin-tag.pt").write_bytes(b"not a checkpoint")
    assert store.trained("lin", model, lambda: {"steps": 2})["steps"] == 2  # retrained
    assert store.trained("lin", model, lambda: {"steps": 3})["cached"] is True


def test_a_study_cell_does_not_depend_on_what_ran_before(tmp_path):
    """Random state inside a cell comes from the study seed and the key, not from the order
    of work (so a resumed run equals a fresh one)."""
    from types import SimpleNamespace

    from medsec.evaluation.context import PROFILES, StudyContext

    data = SimpleNamespace(content_hash="d" * 64)
    ctx = StudyContext(tmp_path, PROFILES["tiny"], data, None, {"sha256": "v" * 64}, "cpu", 0)
    ctx.progress = False
    draw = lambda: {"x": torch.rand(3).tolist()}  # noqa: E731
    first = ctx.cell({"what": "a"}, draw)
    torch.rand(1000)  # other work consumed random numbers
    (tmp_path / "cells").rename(tmp_path / "old")
    assert ctx.cell({"what": "a"}, draw) == first
    assert ctx.cell({"what": "b"}, draw) != first  # another key, another stream
