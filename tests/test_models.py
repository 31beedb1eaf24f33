"""The three forms of `--model` (folder, Hugging Face repo id, GGUF file) and QLoRA, offline.

The demo model stands in for real ones: written out as a GGUF the way llama.cpp writes a Llama
(rows of attn_q/attn_k permuted, tokenizer in the metadata), placed in a fake Hugging Face cache,
or quantized to 4 bits with mlx_lm.convert. tests/test_pretrained.py runs a real model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import ftctl, history, make_workspace, read_yaml, run, status

SHORT = {"iters": 10, "save_every": 5, "steps_per_eval": 5}


# --------------------------------------------------------------------------- GGUF


def _permute(w, n_head: int):
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (the inverse of what the import undoes)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def demo_as_gguf(demo, path: Path) -> Path:
    """The demo model written as llama.cpp writes a float GGUF."""
    import mlx.core as mx

    cfg = json.loads((demo.model_dir / "config.json").read_text())
    tj = json.loads((demo.model_dir / "tokenizer.json").read_text())
    names = {
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
    }
    out = {}
    for k, v in mx.load(str(demo.model_dir / "model.safetensors")).items():
        if k.startswith("model.layers."):
            _, _, i, rest = k.split(".", 3)
            mod, kind = rest.rsplit(".", 1)
            if mod in ("self_attn.q_proj", "self_attn.k_proj"):
                v = _permute(
                    v, cfg["num_attention_heads" if "q_proj" in mod else "num_key_value_heads"]
                )
            out[f"blk.{i}.{names[mod]}.{kind}"] = v
        else:
            out[
                {
                    "model.embed_tokens.weight": "token_embd.weight",
                    "model.norm.weight": "output_norm.weight",
                    "lm_head.weight": "output.weight",
                }[k]
            ] = v
    vocab = sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["id"]: t["content"] for t in tj["added_tokens"]}
    tokens = [added.get(i, t) for t, i in vocab]
    types = [3 if i in added else 1 for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    tc = json.loads((demo.model_dir / "tokenizer_config.json").read_text())
    u32 = lambda x: mx.array(x, dtype=mx.uint32)  # noqa: E731
    meta = {
        "general.architecture": "llama",
        "general.name": "demo",
        "general.file_type": u32(0),
        "llama.block_count": u32(cfg["num_hidden_layers"]),
        "llama.embedding_length": u32(cfg["hidden_size"]),
        "llama.feed_forward_length": u32(cfg["intermediate_size"]),
        "llama.attention.head_count": u32(cfg["num_attention_heads"]),
        "llama.attention.head_count_kv": u32(cfg["num_key_value_heads"]),
        "llama.attention.layer_norm_rms_epsilon": mx.array(cfg["rms_norm_eps"], dtype=mx.float32),
        "llama.rope.freq_base": mx.array(cfg["rope_theta"], dtype=mx.float32),
        "llama.context_length": u32(cfg["max_position_embeddings"]),
        "llama.vocab_size": u32(cfg["vocab_size"]),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": mx.array(types, dtype=mx.int32),
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": u32(tokens.index("<s>")),
        "tokenizer.ggml.eos_token_id": u32(tokens.index("<|end|>")),
        "tokenizer.chat_template": tc.get("chat_template")
        or (demo.model_dir / "chat_template.jinja").read_text(),
    }
    mx.save_gguf(str(path), out, meta)
    return path


def test_gguf_import_is_the_same_model_and_is_committed(tmp_path, demo, capsys):
    import mlx.core as mx
    from mlx_lm import load

    src = demo_as_gguf(demo, tmp_path / "demo.gguf")
    home = tmp_path / "ws"
    code, _, err = run(capsys, "init", "--model", src, "--home", home)
    assert code == 0, err
    folder = home / "models" / "imported" / "demo"
    # inside the workspace: recorded relative to it, so that it moves with it
    assert read_yaml(home / "ftctl.yaml")["model"] == "models/imported/demo"
    (e,) = [x["data"] for x in history(home) if x["type"] == "model_imported"]
    assert (
        e["path"] == "models/imported/demo"
        and e["source"] == str(src)
        and e["quantization"] == "F32"
        and "dtype" not in e
    )
    assert len(e["source_sha256"]) == 64 and not list(folder.parent.glob(".tmp-*"))
    a, ta = load(str(demo.model_dir))
    b, tb = load(str(folder))
    text = "What is 7 plus 8? It is 15, said the demo model."
    assert ta.encode(text) == tb.encode(text)
    chat = [{"role": "user", "content": "What is 2 times 3?"}]
    assert ta.apply_chat_template(chat, add_generation_prompt=True) == tb.apply_chat_template(
        chat, add_generation_prompt=True
    )
    x = mx.array([ta.encode(text)])
    # the un-permuted attention gives the same logits
    assert mx.allclose(a(x), b(x), atol=1e-5).item()
    assert tb.eos_token == "<|end|>"

    # the same file named by --set model= at submit is not converted again; a job records the folder
    ftctl(home, "submit", str(demo.train), "--set", f"model={src}")
    (sub,) = [x["data"] for x in history(home) if x["type"] == "job_submitted"]
    assert sub["config"]["model"] == "models/imported/demo"
    assert [x["type"] for x in history(home)].count("model_imported") == 1

    # recovery keeps the imported model (it is accounted for by its event) and removes import debris
    (folder.parent / ".tmp-demo-123").mkdir()
    ftctl(home, "recover")
    assert folder.is_dir() and not (folder.parent / ".tmp-demo-123").exists()


def test_gguf_dequantized_on_request_and_refusals(tmp_path, demo, capsys):
    import mlx.core as mx

    src = demo_as_gguf(demo, tmp_path / "demo.gguf")
    home = tmp_path / "ws"
    assert run(capsys, "init", "--model", src, "--dtype", "float16", "--home", home)[0] == 0
    w = mx.load(str(home / "models" / "imported" / "demo-float16" / "model.safetensors"))
    assert {v.dtype for v in w.values()} == {mx.float16}

    code, _, err = run(
        capsys, "init", "--model", demo.model_dir, "--dtype", "float16", "--home", tmp_path / "b"
    )
    assert (
        code == 1
        and "--dtype applies to a .gguf --model only" in err
        and not (tmp_path / "b").exists()
    )

    other = tmp_path / "gpt.gguf"
    mx.save_gguf(
        str(other), {"token_embd.weight": mx.zeros((4, 4))}, {"general.architecture": "gpt2"}
    )
    code, _, err = run(capsys, "init", "--model", other, "--home", tmp_path / "c")
    assert (
        code == 1
        and "is a 'gpt2' model" in err
        and "Llama family only" in err
        and "nothing was created" in err.lower()
    )
    assert not (tmp_path / "c").exists()

    sp = tmp_path / "sp.gguf"
    mx.save_gguf(
        str(sp),
        {"token_embd.weight": mx.zeros((4, 4))},
        {"general.architecture": "llama", "tokenizer.ggml.model": "llama"},
    )
    code, _, err = run(capsys, "init", "--model", sp, "--home", tmp_path / "e")
    assert code == 1 and "not sentencepiece ones" in err and not (tmp_path / "e").exists()

    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"GGUF not really")
    code, _, err = run(capsys, "init", "--model", junk, "--home", tmp_path / "d")
    assert code == 1 and "cannot be read as GGUF" in err and not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- Hugging Face repo ids


def test_repo_id_resolves_in_the_local_cache_and_jobs_record_the_revision(
    tmp_path, demo, capsys, monkeypatch
):
    cache = tmp_path / "hf"
    rev = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--tiny-org--demo-llama" / "snapshots" / rev
    shutil.copytree(demo.model_dir, snap)
    (cache / "models--tiny-org--demo-llama" / "refs").mkdir()
    (cache / "models--tiny-org--demo-llama" / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # a relative "tiny-org/demo-llama" must not exist as a path

    home = tmp_path / "ws"
    code, _, err = run(capsys, "init", "--model", "tiny-org/demo-llama", "--home", home)
    assert code == 0, err
    assert f"revision {rev}" in err
    assert read_yaml(home / "ftctl.yaml")["model"] == "tiny-org/demo-llama"
    code, _, err = run(capsys, "submit", demo.train, "--home", home)
    assert code == 0, err
    (sub,) = [x["data"] for x in history(home) if x["type"] == "job_submitted"]
    assert sub["config"]["model"] == str(snap) and sub["model_repo"] == "tiny-org/demo-llama"
    assert sub["model_revision"] == rev
    _, out, _ = run(capsys, "doctor", "--home", home)
    assert "tiny-org/demo-llama loads" in " ".join(out.split())

    code, _, err = run(capsys, "init", "--model", "tiny-org/not-cached", "--home", tmp_path / "b")
    assert code == 1 and "not in the local Hugging Face cache" in err and "never downloads" in err
    assert "hf download tiny-org/not-cached" in err and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------- QLoRA


@pytest.fixture(scope="module")
def qdemo(tmp_path_factory, demo) -> Path:
    """The demo model quantized to 4 bits (group 32), as mlx-community models are."""
    from mlx_lm import convert

    out = tmp_path_factory.mktemp("q") / "demo-4bit"
    convert(str(demo.model_dir), str(out), quantize=True, q_group_size=32, q_bits=4)
    return out


def test_qlora_resume_is_bit_exact_and_consolidation_dequantizes(tmp_path, demo, qdemo):
    import mlx.core as mx
    from mlx_lm import load

    assert "quantization" in json.loads((qdemo / "config.json").read_text())
    ref = make_workspace(tmp_path / "ref", qdemo, **SHORT)
    ftctl(ref, "submit", str(demo.train), "--valid", str(demo.valid))
    ftctl(ref, "start", "--until-idle", "--quiet", timeout=300)
    a = status(ref, "0001")
    assert a["state"] == "completed"

    home = make_workspace(tmp_path / "ws", qdemo, **SHORT)
    ftctl(home, "submit", str(demo.train), "--valid", str(demo.valid))
    marker = tmp_path / "marker"
    ftctl(
        home,
        "start",
        "--until-idle",
        "--quiet",
        env={"FTCTL_CRASH_AT": f"mid_step:7:{marker}"},
        timeout=300,
    )
    b = status(home, "0001")
    assert marker.exists() and [x["type"] for x in history(home)].count("crashed") == 1
    assert b["state"] == "completed" and b["adapter_sha256"] == a["adapter_sha256"]

    # fused into a float model: base + adapter exactly enough for the usual check
    p = ftctl(ref, "consolidate")
    assert "promoted" in p.stdout + p.stderr
    lin = status(ref)["lineages"][0]
    fused = Path(lin["base_model"])
    assert "quantization" not in json.loads((fused / "config.json").read_text())
    x = mx.array([[3, 7, 11, 19, 23]])
    m1, _ = load(str(qdemo), adapter_path=a["adapter_path"])
    m2, _ = load(str(fused))
    assert mx.allclose(m1(x), m2(x), atol=1e-3).item()
