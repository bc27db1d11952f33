"""The NLA pairs crossmap ships (LoRA adapters over the shipped small models): each loads with its hashes
checked and reproduces the explanation and round trip recorded in its manifest for a fixed vector."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from crossmap.models import load_model, make_hidden_fn
from crossmap.nla import Reconstructor, load_nla_verbalizer
from crossmap.nla.adapted import MANIFEST, read_manifest, shipped_nla, shipped_nla_names

PAIRS = ["qwen2.5-coder-0.5b-instruct-L12", "gemma-3-270m-L9"]


def test_the_four_shipped_nlas_are_listed_and_small():
    assert shipped_nla_names() == sorted(f"{p}-{r}" for p in PAIRS for r in ("av", "ar"))
    total = sum(f.stat().st_size for n in shipped_nla_names() for f in shipped_nla(n).iterdir())
    assert total < 30e6


@pytest.mark.parametrize("pair", PAIRS)
def test_shipped_pair_reproduces_its_recorded_explanation(pair):
    av_dir, ar_dir = shipped_nla(pair + "-av"), shipped_nla(pair + "-ar")
    manifest = read_manifest(av_dir)  # every file's sha256 checked
    ref = manifest["reference"]
    lm = load_model(manifest["base"], dtype="float32")
    ids = lm.tokenizer(ref["text"])["input_ids"]
    t = len(ids)
    hidden = make_hidden_fn(lm.model, ref["layer"])(np.array([ids], np.int32), np.arange(t, dtype=np.int32)[None],
                                                    np.ones((1, t), bool))
    vector = np.asarray(hidden)[0, -1:]
    av = load_nla_verbalizer(av_dir, dtype="float32")
    # one row, not the default bucket of 64 rows (7x the time on a 2-core CPU): a row's greedy explanation does not
    # depend on the rows padded beside it
    explained = av.verbalizer.explain(vector, max_new_tokens=ref["max_new_tokens"], temperature=0.0, batch_size=1,
                                      progress=False)
    assert explained[0].parsed[0] == ref["explanation"]
    ar = Reconstructor(ar_dir, dtype="float32")
    np.testing.assert_allclose(ar.score([ref["explanation"]], vector), [ref["round_trip_cosine"]], atol=1e-3)


def test_a_changed_shipped_file_is_refused_naming_it(tmp_path):
    copy = tmp_path / "nla"
    shutil.copytree(shipped_nla("gemma-3-270m-L9-ar"), copy)
    head = copy / "value_head.safetensors"
    data = bytearray(head.read_bytes())
    data[-1] ^= 1
    head.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"value_head.safetensors: sha256 is .* records"):
        Reconstructor(copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    del manifest["base"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="field 'base'"):
        read_manifest(copy)
