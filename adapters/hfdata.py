"""Hugging Face datasets as mlx-lm reads them (`hf_dataset:` entries, or `data: ORG/NAME`), turned
into JSONL once, at submit: the job then trains on its own copy like any other data.

Never downloads: the `datasets` library runs offline (HF_DATASETS_OFFLINE), so a name is found in the
local `datasets` cache or not at all; a folder written by ``save_to_disk`` is read as it is. Splits
take datasets' slicing (``train[:80%]``, ``train[-10%:]+test``), for a cached name and a folder alike.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ftctl.core.config import HFDataset, features
from ftctl.core.dataset import Features

SPLIT_FILES = ("dataset_dict.json", "state.json")  # what save_to_disk writes (DatasetDict, Dataset)
_INSTALL = "pip install 'ftctl[hf]'"


class HFDataError(Exception):
    """The dataset cannot be read as asked; the message says why and what to do."""


def is_saved(path: str | Path) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    p = Path(path).expanduser()
    return p.is_dir() and any((p / f).is_file() for f in SPLIT_FILES)


def _datasets():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before the import: it reads it once
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise HFDataError(
            f"reading Hugging Face datasets needs the `datasets` library: {_INSTALL}"
        ) from None
    datasets.disable_progress_bars()
    # also when something imported the library before: its config read the environment then
    datasets.config.HF_DATASETS_OFFLINE = True
    datasets.config.HF_HUB_OFFLINE = True
    return datasets


def _cache_dir() -> str:
    from datasets import config

    return str(config.HF_DATASETS_CACHE)


def _from_disk(datasets, path: Path, spec: str):
    """A split spec (datasets' slicing) of a save_to_disk folder; a lone Dataset is split 'train'."""
    from datasets.arrow_reader import ReadInstruction

    saved = datasets.load_from_disk(str(path))
    splits = dict(saved) if isinstance(saved, datasets.DatasetDict) else {"train": saved}
    try:
        parts = ReadInstruction.from_spec(spec).to_absolute({k: len(v) for k, v in splits.items()})
    except (ValueError, KeyError, AssertionError) as e:
        raise HFDataError(
            f"split {spec!r} of {path}: {e} (its splits: {', '.join(splits)})"
        ) from None
    rows = []
    for p in parts:
        rows += splits[p.splitname].select(range(p.from_, p.to)).to_list()
    return rows


def _from_cache(datasets, name: str, spec: str, extra: dict):
    try:
        return datasets.load_dataset(name, split=spec, **extra).to_list()
    except (ConnectionError, FileNotFoundError):
        raise HFDataError(
            f"{name} is not in the local Hugging Face datasets cache ({_cache_dir()}) and ftctl never "
            f"downloads. On a machine with internet, `datasets.load_dataset({name!r})` then "
            f"`.save_to_disk(FOLDER)` and copy FOLDER here (hf_dataset: {{path: FOLDER}}), or copy its "
            "cache folder into HF_DATASETS_CACHE"
        ) from None
    except ValueError as e:  # an unknown split, a bad slice, a bad config name
        raise HFDataError(f"{name}: {e}") from None


def _rows(datasets, entry: HFDataset, spec: str) -> list[dict]:
    path = Path(entry.path).expanduser()
    if is_saved(path):
        if entry.config:
            raise HFDataError(
                f"hf_dataset {entry.path}: `config` ({entry.config}) applies to a cached dataset name, "
                "not to a save_to_disk folder: remove it"
            )
        return _from_disk(datasets, path, spec)
    if path.exists():
        raise HFDataError(
            f"hf_dataset path {entry.path} is a {'folder' if path.is_dir() else 'file'} but not one "
            "written by datasets' save_to_disk (no dataset_dict.json or state.json); a folder of "
            "train/valid/test.jsonl goes in `data:` instead"
        )
    return _from_cache(datasets, entry.path, spec, dict(entry.config))


def _jsonl(rows: list[dict], f: Features) -> bytes:
    """One JSON object per row, its feature columns under mlx-lm's default names (a column already
    named like a renamed feature's default is dropped: mlx-lm would not read it either)."""
    renames = {
        src: dst for src, dst in zip(f, ("prompt", "completion", "text", "messages")) if src != dst
    }
    out = []
    for row in rows:
        obj = {k: v for k, v in row.items() if k not in renames and k not in renames.values()}
        obj.update({dst: row[src] for src, dst in renames.items() if src in row})
        out.append(json.dumps(obj, ensure_ascii=False, default=str) + "\n")
    return "".join(out).encode()


def load(entries: list[HFDataset], *, valid: bool = True, test: bool = False) -> dict[str, bytes]:
    """{"train": JSONL, "valid": JSONL, "test": JSONL} of the entries, concatenated in order (as
    mlx-lm concatenates several), each row's feature columns under mlx-lm's default names. "valid" is
    left out when not asked, "test" unless ``test`` (then every entry needs a test_split)."""
    datasets = _datasets()
    out: dict[str, bytes] = {}
    wanted = [("train", "train_split")] + ([("valid", "valid_split")] if valid else [])
    wanted += [("test", "test_split")] if test else []
    for split, key in wanted:
        parts = []
        for e in entries:
            spec = getattr(e, key)
            if spec is None:
                raise HFDataError(
                    f"test: true, but hf_dataset {e.path} has no test_split: name one (e.g. test_split: test)"
                )
            parts.append(_jsonl(_rows(datasets, e, spec), features(e)))
        out[split] = b"".join(parts)
    return out


def load_named(name: str, f: Features) -> dict[str, bytes]:
    """`data: ORG/NAME` (mlx-lm's load_hf_dataset): the cached dataset's train, valid and test splits,
    those that exist, rows as they are (the config's *_feature keys read them)."""
    datasets = _datasets()
    path = Path(name).expanduser()
    if is_saved(path):
        saved = datasets.load_from_disk(str(path))
        splits = dict(saved) if isinstance(saved, datasets.DatasetDict) else {"train": saved}
    else:
        try:
            splits = dict(datasets.load_dataset(name))
        except (ConnectionError, FileNotFoundError):
            raise HFDataError(
                f"data {name!r} is neither a folder (train.jsonl, valid.jsonl, test.jsonl) nor a dataset in "
                f"the local Hugging Face datasets cache ({_cache_dir()}), and ftctl never downloads: point "
                "data at a folder, or at a save_to_disk copy of the dataset"
            ) from None
        except ValueError as e:
            raise HFDataError(f"data {name!r}: {e}") from None
    identity = Features()
    return {
        n: _jsonl(splits[n].to_list(), identity) for n in ("train", "valid", "test") if n in splits
    }
