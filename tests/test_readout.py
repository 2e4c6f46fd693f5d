"""The readout file: round trip, the original four-key schema, and every damaged-file error."""

import json

import pytest
import torch
from safetensors.torch import save_file

from amygdala.readout import Readout, ReadoutError


def make(n=3, hidden=8, layers=(1, 2), stats=True) -> Readout:
    g = torch.Generator().manual_seed(0)
    vecs = {l: torch.nn.functional.normalize(torch.randn(n, hidden, generator=g), dim=1) for l in layers}
    mean = {l: torch.randn(n, generator=g) for l in layers} if stats else None
    std = {l: torch.rand(n, generator=g) + 0.5 for l in layers} if stats else None
    return Readout([f"c{i}" for i in range(n)], list(layers), vecs, mean, std, meta={"method": "diffmean"})


def test_round_trip(tmp_path):
    r = make()
    r.save(tmp_path / "out")
    back = Readout.load(tmp_path / "out")
    assert back.concepts == r.concepts and back.layers == r.layers and back.hidden_size == 8
    for l in r.layers:
        torch.testing.assert_close(back.vectors[l], r.vectors[l])
        torch.testing.assert_close(back.std[l], r.std[l])
    info = json.loads((tmp_path / "out" / "readout.json").read_text())
    assert info["format_version"] == 1 and info["site"] == "block_output" and info["method"] == "diffmean"
    assert Readout.load(tmp_path / "out" / "readout.json").concepts == r.concepts


def test_float16_storage(tmp_path):
    r = make()
    r.meta["dtype"] = "float16"
    r.save(tmp_path / "o")
    back = Readout.load(tmp_path / "o")
    assert back.meta["dtype"] == "float16"
    torch.testing.assert_close(back.vectors[1], r.vectors[1], atol=1e-3, rtol=1e-3)


def test_original_four_key_schema_loads(tmp_path):
    save_file({"layer_5.vectors": torch.eye(2, 4)}, tmp_path / "readout.safetensors")
    (tmp_path / "readout.json").write_text(json.dumps({"concepts": ["a", "b"], "layers": [5], "hidden_size": 4, "dtype": "float32"}))
    r = Readout.load(tmp_path)
    assert r.concepts == ["a", "b"] and not r.has_stats


def test_overwrite_existing_folder(tmp_path):
    make(n=3).save(tmp_path / "o")
    make(n=2).save(tmp_path / "o")
    assert len(Readout.load(tmp_path / "o").concepts) == 2


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: (d / "readout.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "readout.json").write_text('{"concepts": ["a"]}'), "missing field"),
        (lambda d: (d / "readout.safetensors").write_bytes(b"\x00garbage"), "damaged"),
        (lambda d: (d / "readout.safetensors").unlink(), "missing"),
        (lambda d: save_file({"layer_1.vectors": torch.zeros(3, 7), "layer_2.vectors": torch.zeros(3, 8)}, d / "readout.safetensors"), r"shape \(3, 7\)"),
        (lambda d: save_file({"layer_1.vectors": torch.zeros(3, 8)}, d / "readout.safetensors"), "no tensor layer_2.vectors"),
    ],
)
def test_damaged_files_name_the_problem(tmp_path, damage, match):
    make().save(tmp_path / "o")
    damage(tmp_path / "o")
    with pytest.raises(ReadoutError, match=match):
        Readout.load(tmp_path / "o")


def test_check_model_names_both_sizes():
    r = make(hidden=8, layers=(1, 9))
    with pytest.raises(ReadoutError, match=r"hidden size 8 .*hidden size 16"):
        r.check_model(12, 16, "m")
    with pytest.raises(ReadoutError, match=r"\[9\].*4 layers"):
        r.check_model(4, 8, "m")


def test_unknown_concept_lists_nearest():
    with pytest.raises(ReadoutError, match="nearest: c1"):
        make().concept_index("c11")


def test_zscore_uses_statistics():
    r = make(layers=(1,))
    raw = r.mean[1] + 2 * r.std[1]
    torch.testing.assert_close(r.zscore(raw[None]), torch.full((1, 3), 2.0))


def test_manifest_describes_concepts_only_with_aligned_lists():
    """What /v1/readout/manifest and the page get: per-concept metadata only when it has one
    entry per concept (a stale list from an edited file is left out rather than misread)."""
    vectors = {3: torch.nn.functional.normalize(torch.randn(2, 8), dim=1)}
    meta = {"model": {"name": "m", "num_layers": 4}, "clusters": ["x", "y"], "valence": [0.5, None],
            "descriptions": ["one"]}  # too short: dropped
    r = Readout(["a", "b"], [3], vectors, {3: torch.zeros(2)}, {3: torch.ones(2)}, meta=meta)
    m = r.manifest()
    assert m["concepts"] == ["a", "b"] and m["layers"] == [3] and m["hidden_size"] == 8 and m["zscore"]
    assert m["clusters"] == ["x", "y"] and m["valence"] == [0.5, None] and "descriptions" not in m
    assert m["model"] == "m" and m["mean"] == [[0.0, 0.0]] and m["std"] == [[1.0, 1.0]]
    assert "mean" not in r.manifest(stats=False)


def _half_swapped(tmp_path):
    """The folder between a save's two renames: the old json beside the new tensors."""
    make(n=3).save(tmp_path / "o")
    make(n=2).save(tmp_path / "new")
    (tmp_path / "new" / "readout.safetensors").replace(tmp_path / "o" / "readout.safetensors")
    return tmp_path / "o", tmp_path / "new" / "readout.json"


def test_a_reader_between_the_two_renames_reads_again_and_gets_the_new_pair(tmp_path, monkeypatch):
    """The reader's wait is where the writer's second rename lands (no race: the sleep does it)."""
    from amygdala.readout import files as fmt

    folder, new_json = _half_swapped(tmp_path)
    waits = []
    monkeypatch.setattr(fmt.time, "sleep", lambda s: (waits.append(s), new_json.replace(folder / "readout.json")))
    r = Readout.load(folder)
    assert len(waits) == 1 and r.concepts == ["c0", "c1"] and r.vectors[1].shape == (2, 8)


def test_a_pair_from_two_saves_that_stays_so_is_a_clear_error(tmp_path, monkeypatch):
    from amygdala.readout import files as fmt

    folder, _ = _half_swapped(tmp_path)
    monkeypatch.setattr(fmt.time, "sleep", lambda s: None)
    with pytest.raises(ReadoutError, match="are from different saves .* another process is writing this readout"):
        Readout.load(folder)
