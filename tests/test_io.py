import errno

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.allocation.methods import allocate
from pipeline.allocation.problem import Problem
from pipeline.edges import io, tables
from pipeline.errors import PipelineError
from pipeline.nn.models import build_model, load_weights, normalize_state_dict
from pipeline.profiling.distortion import DistortionCurves, sparsity_grid


def make_curves() -> DistortionCurves:
    rng = np.random.default_rng(0)
    mean = np.cumsum(rng.random((3, 5)), axis=1)
    return DistortionCurves(
        ["a.conv", "b", "head"],
        np.array([9, 100, 7]),
        sparsity_grid(5),
        mean,
        2 * mean,
        np.array([16, 4, 1]),
    )


def test_distortion_roundtrip_schema_and_bytes(tmp_path):
    curves = make_curves()
    tables.write_distortion(tmp_path / "d.parquet", curves, {"rdprune.arch": "x"})
    tables.write_distortion(tmp_path / "e.parquet", curves, {"rdprune.arch": "x"})
    assert (tmp_path / "d.parquet").read_bytes() == (tmp_path / "e.parquet").read_bytes()
    table = pq.read_table(tmp_path / "d.parquet")
    assert table.num_rows == 15
    assert table.schema.field("layer").type == pa.string()
    assert table.schema.field("numel").type == pa.int64()
    assert table.schema.metadata[b"rdprune.schema_version"] == tables.SCHEMA_VERSION.encode()
    assert table.column("flops").to_pylist()[:5] == [144, 112, 64, 32, 0]  # kept x MACs per weight
    back = tables.read_distortion(tmp_path / "d.parquet")
    assert back.layers == curves.layers
    assert np.array_equal(back.mean, curves.mean) and np.array_equal(back.max, curves.max)
    assert np.array_equal(back.sparsity, curves.sparsity) and np.array_equal(
        back.numel, curves.numel
    )


def test_allocation_roundtrip(tmp_path):
    allocation = allocate(
        "rd", Problem(make_curves(), "mean", {"params": 0.5}, np.zeros(3), np.ones(3))
    )
    tables.write_allocation(tmp_path / "a.parquet", allocation, {})
    back = tables.read_allocation(tmp_path / "a.parquet")
    assert back.layers == allocation.layers and np.array_equal(back.kept, allocation.kept)
    assert np.array_equal(back.sparsity, allocation.sparsity)
    assert (
        np.array_equal(back.flops, allocation.flops) and back.lower_bound == allocation.lower_bound
    )
    tables.write_pareto(tmp_path / "p.parquet", [(0.5, allocation), (0.7, allocation)], {})
    table = pq.read_table(tmp_path / "p.parquet")
    assert table.num_rows == 6 and table.column("ratio").to_pylist() == [0.5] * 3 + [0.7] * 3


def test_missing_level_and_corrupt_tables_are_rejected(tmp_path):
    path = tmp_path / "d.parquet"
    tables.write_distortion(path, make_curves(), {})
    table = pq.read_table(path)
    pq.write_table(table.slice(0, 14), tmp_path / "short.parquet")
    with pytest.raises(PipelineError, match="every level"):
        tables.read_distortion(tmp_path / "short.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(PipelineError, match="corrupt or not Parquet"):
        tables.read_distortion(tmp_path / "bad.parquet")
    with pytest.raises(PipelineError, match="run the profile stage"):
        tables.read_distortion(tmp_path / "missing.parquet")
    old = table.replace_schema_metadata({b"rdprune.schema_version": b"0"})
    pq.write_table(old, tmp_path / "old.parquet")
    with pytest.raises(PipelineError, match="schema version"):
        tables.read_distortion(tmp_path / "old.parquet")


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def boom(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "replace", boom)
    with pytest.raises(PipelineError, match=rf"cannot write {target}: No space left on device"):
        io.write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_a_full_disk_in_a_write_is_one_error_line_and_no_temporary(tmp_path, monkeypatch):
    """ENOSPC in the middle of the data (as a full disk raises it from write or fsync)."""
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "fsync", full)
    with pytest.raises(PipelineError) as err:
        io.write_json(target, {"a": 1})
    assert "\n" not in str(err.value) and str(target) in str(err.value)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_temporaries_left_by_a_kill_are_removed(tmp_path):
    paths = io.Paths(tmp_path)
    folder = paths.round(1)
    folder.mkdir(parents=True)
    (folder / "model.pt").write_bytes(b"x")
    stray = [folder / ".model.pt.abc123.tmp", paths.metrics("prune").parent / ".p.json.x.tmp"]
    for path in stray:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half")
    elsewhere = [tmp_path / ".venv" / ".x.tmp", tmp_path / "data" / ".photo.tmp"]
    for path in elsewhere:  # not the pipeline's: never touched
        path.parent.mkdir(parents=True)
        path.write_bytes(b"theirs")
    assert sorted(io.remove_temporaries(paths)) == sorted(stray)
    assert not any(p.exists() for p in stray) and (folder / "model.pt").exists()
    assert all(p.exists() for p in elsewhere)


def test_checkpoint_roundtrip_is_plain_and_deterministic(tmp_path):
    torch.manual_seed(0)
    model = build_model("digits_cnn", 1, 10)
    io.write_state_dict(tmp_path / "a.pt", model.state_dict())
    io.write_state_dict(tmp_path / "b.pt", model.state_dict())
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    fresh = build_model("digits_cnn", 1, 10)
    fresh.load_state_dict(torch.load(tmp_path / "a.pt"))  # plain torch.load + load_state_dict
    assert torch.equal(fresh.fc.weight, model.fc.weight)


def test_mismatched_and_corrupt_checkpoints(tmp_path):
    model = build_model("digits_cnn", 1, 10)
    other = build_model("digits_cnn", 1, 7)
    with pytest.raises(
        PipelineError, match=r"does not match model.arch = 'digits_cnn' \(shape: fc.bias"
    ):
        load_weights(model, other.state_dict(), "x.pt", "digits_cnn")
    wrapped = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    load_weights(
        other.__class__(1, 10), normalize_state_dict(wrapped, "x.pt"), "x.pt", "digits_cnn"
    )
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(PipelineError, match="corrupt"):
        io.read_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(PipelineError, match="not found"):
        io.read_checkpoint(tmp_path / "none.pt", "model.checkpoint")
