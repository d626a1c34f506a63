"""Checkpoint folders: atomic write, `latest`, pruning, verification and fallback."""
import pytest
import torch

from hpclm.train import checkpoint
from hpclm.errors import HpclmError


def _save(run, step, keep_last=3):
    files = {"model.pt": checkpoint.tensor_bytes({"w": torch.full((4,), float(step))}), "note.txt": f"step {step}"}
    return checkpoint.save(run, step, files, keep_last)


def _steps(run):
    return [checkpoint.step_of(p) for p in checkpoint.listing(run)]


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_prune_keeps_exactly_keep_last(tmp_path, keep_last):
    for step in range(100, 700, 100):
        _save(tmp_path, step, keep_last)
        assert checkpoint.read_latest(tmp_path) == step
        assert _steps(tmp_path) == list(range(100, step + 1, 100))[-keep_last:]
    assert sorted(p.name for p in checkpoint.root(tmp_path).iterdir()) == \
        [checkpoint.name(s) for s in range(700 - 100 * keep_last, 700, 100)] + ["latest"]


def test_keep_last_zero_keeps_all(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step, keep_last=0)
    assert _steps(tmp_path) == [1, 2, 3, 4]


def test_contents_load_with_weights_only_and_verify(tmp_path):
    path = _save(tmp_path, 100)
    assert path.name == "iter_0000100" and checkpoint.verify(path) is None
    assert torch.equal(checkpoint.load(path, "model.pt")["w"], torch.full((4,), 100.0))
    assert checkpoint.load(path, "note.txt") == "step 100"
    assert checkpoint.resolve(tmp_path) == path and checkpoint.resolve(path) == path
    assert checkpoint.resolve(checkpoint.root(tmp_path)) == path


def test_corrupt_latest_falls_back_to_previous_complete(tmp_path):
    for step in (10, 20, 30):
        _save(tmp_path, step)
    newest = checkpoint.root(tmp_path) / "iter_0000030"
    data = (newest / "model.pt").read_bytes()
    (newest / "model.pt").write_bytes(data[: len(data) // 2])  # truncated
    (checkpoint.root(tmp_path) / "iter_0000020" / "note.txt").write_text("step 2O")  # same size, other bytes
    warnings = []
    found = checkpoint.find_resumable(tmp_path, warnings.append)
    assert found.name == "iter_0000010"
    assert "iter_0000030 is incomplete or corrupt (model.pt has" in warnings[0]
    assert "iter_0000020 is incomplete or corrupt (note.txt does not match its SHA-256" in warnings[1]
    assert (checkpoint.root(tmp_path) / "iter_0000030.corrupt").is_dir()  # kept for inspection, out of the way
    assert _steps(tmp_path) == [10]


def test_no_complete_checkpoint_is_an_error(tmp_path):
    path = _save(tmp_path, 5)
    (path / "manifest.json").unlink()
    with pytest.raises(HpclmError, match="has checkpoints but none is complete"):
        checkpoint.find_resumable(tmp_path, lambda _: None)
    assert checkpoint.find_resumable(tmp_path / "elsewhere") is None


def test_missing_latest_uses_newest_complete(tmp_path):
    _save(tmp_path, 1)
    _save(tmp_path, 2)
    (checkpoint.root(tmp_path) / "latest").unlink()
    warnings = []
    assert checkpoint.find_resumable(tmp_path, warnings.append).name == "iter_0000002"
    assert "missing or unreadable" in warnings[0]


def test_resaving_a_step_replaces_it_whole(tmp_path):
    _save(tmp_path, 7)
    files = {"model.pt": checkpoint.tensor_bytes({"w": torch.zeros(2)})}
    path = checkpoint.save(tmp_path, 7, files)
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.pt"]
    assert [p.name for p in checkpoint.root(tmp_path).iterdir() if p.name.startswith(".")] == []


def test_prune_keeps_what_a_rollback_could_reach(tmp_path):
    """keep_from: the newest checkpoint at or before it, and every one after it, survive keep_last."""
    for step in range(10, 110, 10):
        checkpoint.save(tmp_path, step, {"a.json": "{}"}, keep_last=2, keep_from=step - 25)
    assert _steps(tmp_path) == [70, 80, 90, 100]  # 75 reaches back to 70
    checkpoint.save(tmp_path, 110, {"a.json": "{}"}, keep_last=2)  # without: only keep_last
    assert _steps(tmp_path) == [100, 110]
