"""transformers' module index kept on disk (adapters/transformers_index.py): what is read back is what
transformers builds, it is really read back, and anything unexpected leaves transformers in charge.
Each run is a fresh interpreter: the index is built when transformers is first imported."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ftctl.adapters import transformers_index as TI

# imports transformers through mlx-lm as the worker does; prints what the index function is and the
# names transformers' top-level lazy module serves
RUN = """
import sys, json
from pathlib import Path
from ftctl.adapters import transformers_index
if sys.argv[1] != "-": transformers_index.install(Path(sys.argv[1]))
import mlx_lm.tokenizer_utils, transformers
import transformers.utils.import_utils as iu
transformers.AutoTokenizer
print(json.dumps({"cached": hasattr(iu.define_import_structure, "ftctl_cache"),
                  "names": sorted(dir(transformers))}))
"""

# what transformers itself builds for the arguments each cached file was made for
REAL = """
import sys, json
import transformers, transformers.utils.import_utils as iu
from ftctl.adapters.transformers_index import _encode
args = json.loads(sys.argv[1])
real = getattr(iu.define_import_structure, "__wrapped__", iu.define_import_structure)
print(json.dumps([_encode(real(Path, prefix)) for Path, prefix in args]))
"""


def run(cache) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", RUN, str(cache)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.splitlines()[-1])


def test_the_index_read_back_is_transformers_own_and_is_really_read(tmp_path):
    cache = tmp_path / "cache"
    plain = run("-")
    first = run(cache)  # builds and keeps it
    files = sorted(cache.glob("transformers-index-*.json"))
    assert first["cached"] and not plain["cached"]
    assert len(files) >= 2 and not list(cache.glob("*.tmp"))
    assert run(cache)["names"] == first["names"] == plain["names"]

    # each kept file holds what transformers builds, for the arguments it was kept for
    import transformers

    root = Path(transformers.__file__).parent
    candidates = [(str(root), None), (str(root / "models"), "models"), (str(root / "models"), None)]
    kept = {f.name: json.loads(f.read_text()) for f in files}
    real = json.loads(
        subprocess.run(
            [sys.executable, "-c", "from pathlib import Path\n" + REAL, json.dumps(candidates)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()[-1]
    )
    matched = [r for r in real if r in kept.values()]
    assert (
        len(matched) >= 2
    )  # the top level's and the models' index, exactly as transformers builds them

    # really read back: a name added to the kept models index is served by transformers' lazy module
    planted = 0
    for f in files:
        data = json.loads(f.read_text())
        for backends, modules in data:
            if not backends and "models.llama.configuration_llama" in modules:
                modules["models.llama.configuration_llama"].append("FtctlPlantedName")
                planted += 1
        f.write_text(json.dumps(data))
    assert planted == 1
    assert "FtctlPlantedName" in run(cache)["names"]


def test_a_damaged_index_is_rebuilt_and_imports_are_unchanged(tmp_path):
    cache = tmp_path / "cache"
    names = run(cache)["names"]
    for f in cache.glob("transformers-index-*.json"):
        f.write_text('{"not": "an index"')  # truncated, as after a crash mid-write elsewhere
    assert run(cache)["names"] == names
    for f in cache.glob("transformers-index-*.json"):
        json.loads(f.read_text())  # rewritten whole


def test_an_unwritable_cache_changes_nothing(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    assert run(blocked / "cache")["names"] == run("-")["names"]
    assert blocked.read_text() == "a file where the cache folder would be"


def test_no_key_without_exactly_one_dist_info_beside_the_package(tmp_path):
    pkg = tmp_path / "transformers"
    pkg.mkdir()
    assert TI._installation(pkg) is None  # a source checkout: no dist-info
    info = tmp_path / "transformers-5.0.0.dist-info"
    info.mkdir()
    (info / "RECORD").write_text("a\n")
    key = TI._installation(pkg)
    assert key
    (info / "RECORD").write_text("a reinstall rewrites RECORD\n")
    assert TI._installation(pkg) != key
    (tmp_path / "transformers-4.0.0.dist-info").mkdir()
    assert TI._installation(pkg) is None  # two installs' leftovers: which one is this?


@pytest.mark.parametrize(
    "shape",
    [[], {"a": {}}, {frozenset(): []}, {frozenset(): {"m": ["x"]}}, {frozenset(): {"m": {1: 2}}}],
)
def test_only_the_known_shape_is_kept(shape):
    with pytest.raises(TypeError):
        TI._encode(shape)
    good = {frozenset({"tokenizers"}): {"m.a": {"A", "B"}}, frozenset(): {"m.b": set()}}
    assert TI._decode(json.loads(json.dumps(TI._encode(good)))) == good
