"""A Hugging Face directory's model.safetensors.index.json: shards are read only from inside the model
directory, and a malformed index is an error that names the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tformer.interop.common import HF_INDEX, InteropError, read_hf_tensors


def _model_dir(tmp_path: Path, weight_map: object) -> Path:
    """A directory with two shards and an index holding `weight_map`; a third shard outside it."""
    d = tmp_path / "model"
    d.mkdir()
    save_file({"a": torch.ones(2)}, str(d / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(d / "model-00002-of-00002.safetensors"))
    save_file({"secret": torch.full((1,), 7.0)}, str(tmp_path / "outside.safetensors"))
    (d / HF_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return d


GOOD = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}


def test_shards_inside_the_directory_are_read(tmp_path: Path) -> None:
    d = _model_dir(tmp_path, GOOD)
    (d / "sub").mkdir()
    os.replace(d / GOOD["b"], d / "sub" / "b.safetensors")
    (d / "alias.safetensors").symlink_to(d / GOOD["a"])  # a link that stays inside is fine
    with open(d / HF_INDEX, "w") as f:
        json.dump({"weight_map": {"a": "alias.safetensors", "b": "sub/b.safetensors"}}, f)
    tensors = read_hf_tensors(d)
    assert sorted(tensors) == ["a", "b"]
    torch.testing.assert_close(tensors["a"], torch.ones(2))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_a_shard_name_outside_the_directory_is_refused(tmp_path: Path, shard: str) -> None:
    if shard == "ABSOLUTE":
        shard = str(tmp_path / "outside.safetensors")
    d = _model_dir(tmp_path, {**GOOD, "secret": shard})
    (d / "sub").mkdir()
    with pytest.raises(InteropError) as err:
        read_hf_tensors(d)
    message = str(err.value)
    assert str(d / HF_INDEX) in message and repr(shard) in message and "outside" in message


def test_a_shard_that_links_outside_the_directory_is_refused(tmp_path: Path) -> None:
    d = _model_dir(tmp_path, {**GOOD, "secret": "link.safetensors"})
    (d / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    with pytest.raises(InteropError, match=r"shard 'link.safetensors' .*outside"):
        read_hf_tensors(d)


def test_a_hub_cache_snapshot_reads_its_blobs(tmp_path: Path) -> None:
    """The Hugging Face hub's cache keeps each file in blobs/ and links it from snapshots/<revision>/:
    links into the same cached repository's blobs are the cache's own layout, not an escape."""
    repo = tmp_path / "models--org--tiny"
    snapshot, blobs = repo / "snapshots" / "0123abc", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for name, (key, value) in zip(GOOD.values(), [("a", torch.ones(2)), ("b", torch.zeros(3))], strict=True):
        save_file({key: value}, str(blobs / f"hash-{key}"))
        (snapshot / name).symlink_to(Path("../..") / "blobs" / f"hash-{key}")
    (blobs / "hash-index").write_text(json.dumps({"weight_map": GOOD}))
    (snapshot / HF_INDEX).symlink_to(Path("../..") / "blobs" / "hash-index")
    assert sorted(read_hf_tensors(snapshot)) == ["a", "b"]
    # but not a link out of the cached repository
    save_file({"secret": torch.ones(1)}, str(tmp_path / "outside.safetensors"))
    (snapshot / "escape.safetensors").symlink_to(tmp_path / "outside.safetensors")
    (blobs / "hash-index").write_text(json.dumps({"weight_map": {**GOOD, "secret": "escape.safetensors"}}))
    with pytest.raises(InteropError, match="shard 'escape.safetensors' .*outside"):
        read_hf_tensors(snapshot)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object with a 'weight_map'"),
        ('{"metadata": {}}', "has no 'weight_map'"),
        ('{"weight_map": ["a.safetensors"]}', "'weight_map' is a list; expected an object"),
        ('{"weight_map": {}}', "'weight_map' is empty"),
        ('{"weight_map": {"a": 3}}', "'weight_map' entry 'a': 3; expected a shard file name"),
        ('{"weight_map": {"a": ""}}', "'weight_map' entry 'a': ''; expected a shard file name"),
    ],
)
def test_a_malformed_index_is_an_error_naming_the_file(tmp_path: Path, text: str, message: str) -> None:
    d = _model_dir(tmp_path, GOOD)
    (d / HF_INDEX).write_text(text)
    with pytest.raises(InteropError) as err:
        read_hf_tensors(d)
    assert str(err.value).startswith(f"{d / HF_INDEX}: ") and message in str(err.value)
