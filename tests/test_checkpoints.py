"""Parity with transformers.CLIPModel on the same (random) weights, in every checkpoint layout."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from clip_core import create_model, load_model, save_hf, save_model
from clip_core.checkpoints import CheckpointError, load_state
from conftest import hf_features, make_hf_clip

TOL = 1e-4
# Real token ids: "a photo of a cat." and "a diagram" (SOT ... EOT, zero padded), plus a long row.
TOKEN_ROWS = [
    [49406, 320, 1125, 539, 320, 2368, 269, 49407],
    [49406, 320, 22697, 49407],
    [49406] + list(range(1000, 1070)) + [49407],
]


def tokens(context_length: int = 77) -> torch.Tensor:
    out = torch.zeros(len(TOKEN_ROWS), context_length, dtype=torch.long)
    for i, row in enumerate(TOKEN_ROWS):
        row = row[: context_length - 1] + [49407] if len(row) > context_length else row
        out[i, : len(row)] = torch.tensor(row)
    return out


def pixels(resolution: int, n: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, resolution, resolution, generator=g)


def assert_parity(ours, hf, resolution: int, context_length: int = 77):
    px, tk = pixels(resolution), tokens(context_length)
    with torch.no_grad():
        ref_img = hf_features(hf.get_image_features(pixel_values=px))
        ref_txt = hf_features(hf.get_text_features(input_ids=tk))
        img, txt = ours.encode_image(px), ours.encode_text(tk)
    d_img = (img - ref_img).abs().max().item()
    d_txt = (txt - ref_txt).abs().max().item()
    assert d_img <= TOL, f"image features differ by {d_img}"
    assert d_txt <= TOL, f"text features differ by {d_txt}"
    return d_img, d_txt


def openai_state_from_hf(hf) -> dict[str, torch.Tensor]:
    """An independent, explicit HF -> OpenAI renaming (the layout of OpenAI's ViT-B-32.pt)."""
    sd = hf.state_dict()
    out = {
        "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
        "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
        "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
        "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
        "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
        "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
        "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
        "visual.proj": sd["visual_projection.weight"].t(),
        "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
        "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
        "ln_final.weight": sd["text_model.final_layer_norm.weight"],
        "ln_final.bias": sd["text_model.final_layer_norm.bias"],
        "text_projection": sd["text_projection.weight"].t(),
        "logit_scale": sd["logit_scale"],
    }
    for tower, ours in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
        n = hf.config.vision_config.num_hidden_layers if tower == "vision_model" else hf.config.text_config.num_hidden_layers
        for i in range(n):
            h, o = f"{tower}.encoder.layers.{i}.", f"{ours}.resblocks.{i}."
            for kind in ("weight", "bias"):
                out[o + f"attn.in_proj_{kind}"] = torch.cat(
                    [sd[h + f"self_attn.{x}_proj.{kind}"] for x in "qkv"], dim=0)
                out[o + f"attn.out_proj.{kind}"] = sd[h + f"self_attn.out_proj.{kind}"]
                out[o + f"ln_1.{kind}"] = sd[h + f"layer_norm1.{kind}"]
                out[o + f"ln_2.{kind}"] = sd[h + f"layer_norm2.{kind}"]
                out[o + f"mlp.c_fc.{kind}"] = sd[h + f"mlp.fc1.{kind}"]
                out[o + f"mlp.c_proj.{kind}"] = sd[h + f"mlp.fc2.{kind}"]
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


@pytest.fixture(scope="module")
def hf_b32(hf_b32_dir):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(hf_b32_dir).eval()


def test_hf_folder_parity_vit_b32(hf_b32_dir, hf_b32):
    ours = load_model(hf_b32_dir)
    assert ours.config.vision.width == 768 and ours.config.vision.patch_size == 32
    assert ours.config.activation == "quick_gelu"
    d = assert_parity(ours, hf_b32, 224)
    print(f"HF folder ViT-B/32 max abs diff image={d[0]:.2e} text={d[1]:.2e}")
    # the full forward agrees too (logits use logit_scale)
    px, tk = pixels(224), tokens()
    with torch.no_grad():
        ref = hf_b32(input_ids=tk, pixel_values=px).logits_per_image
        mine, mine_t = ours(px, tk)
    assert torch.allclose(mine, ref, atol=1e-3)
    assert torch.equal(mine_t, mine.t())


def test_hf_pytorch_model_bin_folder(tmp_path, hf_b32):
    hf_b32.save_pretrained(tmp_path, safe_serialization=False) if "safe_serialization" in \
        hf_b32.save_pretrained.__code__.co_varnames else None
    if not (tmp_path / "pytorch_model.bin").exists():  # newer transformers only write safetensors
        (tmp_path / "model.safetensors").unlink(missing_ok=True)
        torch.save(hf_b32.state_dict(), tmp_path / "pytorch_model.bin")
        hf_b32.config.save_pretrained(tmp_path)
    assert_parity(load_model(tmp_path), hf_b32, 224)


def test_openai_plain_state_dict_fp16_with_extra_keys(tmp_path, hf_b32):
    state = {k: v.half() for k, v in openai_state_from_hf(hf_b32).items()}
    state.update(input_resolution=torch.tensor(224), context_length=torch.tensor(77), vocab_size=torch.tensor(49408))
    path = tmp_path / "ViT-B-32.pt"
    torch.save(state, path)
    ours = load_model(path)
    assert next(ours.parameters()).dtype == torch.float32
    # reference: the same fp16-rounded weights in the HF model
    import copy

    ref = copy.deepcopy(hf_b32)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(p.half().float())
    assert_parity(ours, ref, 224)


def test_openai_torchscript_archive(tmp_path, hf_b32):
    """OpenAI ships JIT archives; only the state dict is read, the scripted module is dropped."""
    model = create_model("ViT-B-32")
    model.load_state_dict(openai_state_from_hf(hf_b32))
    model.register_buffer("input_resolution", torch.tensor(224))
    del model.context_length  # a plain int on our module; OpenAI archives hold it as a tensor
    model.register_buffer("context_length", torch.tensor(77))
    model.register_buffer("vocab_size", torch.tensor(49408))
    model.eval()
    traced = torch.jit.trace(model, (pixels(224, 1), tokens()[:1]), check_trace=False)
    path = tmp_path / "ViT-B-32-jit.pt"
    torch.jit.save(traced, str(path))
    ours = load_model(path)
    assert type(ours).__name__ == "CLIP" and not isinstance(ours, torch.jit.ScriptModule)
    assert_parity(ours, hf_b32, 224)


@pytest.mark.parametrize("layout", ["pt-wrapped", "bin-module-prefix", "safetensors-module-prefix"])
def test_open_clip_layouts(tmp_path, hf_b32, layout):
    state = openai_state_from_hf(hf_b32)
    if layout == "pt-wrapped":
        path = tmp_path / "open_clip_model.pt"
        torch.save({"epoch": 32, "name": "ViT-B-32", "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif layout == "bin-module-prefix":
        path = tmp_path / "open_clip_pytorch_model.bin"
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        path = tmp_path / "open_clip_model.safetensors"
        save_file({f"module.{k}": v for k, v in state.items()}, str(path))
    assert_parity(load_model(path), hf_b32, 224)


def test_open_clip_gelu_from_sidecar_config(tmp_path):
    hf = make_hf_clip(3, hidden_act="gelu", vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=2, image_size=64, patch_size=16),
                      text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2),
                      projection_dim=64)
    path = tmp_path / "open_clip_model.safetensors"
    save_file(openai_state_from_hf(hf), str(path))
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 64}}))
    ours = load_model(path)
    assert ours.config.activation == "gelu"
    assert_parity(ours, hf, 64)
    # without the sidecar the caller says so explicitly
    (tmp_path / "open_clip_config.json").unlink()
    assert load_model(path).config.activation == "quick_gelu"
    assert_parity(load_model(path, activation="gelu"), hf, 64)


NON_PRESET = dict(
    vision=dict(hidden_size=192, intermediate_size=640, num_hidden_layers=3, num_attention_heads=3,
                image_size=96, patch_size=12),
    text=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=40),
    projection_dim=96,
)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_non_preset_shape_is_inferred_hf(tmp_path, act):
    hf = make_hf_clip(5, hidden_act=act, **NON_PRESET)
    hf.save_pretrained(tmp_path)
    ours = load_model(tmp_path)
    c = ours.config
    assert (c.vision.image_size, c.vision.patch_size, c.vision.width, c.vision.layers) == (96, 12, 192, 3)
    assert (c.text.context_length, c.text.width, c.text.layers, c.embed_dim) == (40, 128, 2, 96)
    assert c.activation == act and c.vision.mlp_ratio == 640 / 192
    assert_parity(ours, hf, 96, context_length=40)


def test_non_preset_shape_is_inferred_openai_layout(tmp_path):
    hf = make_hf_clip(6, **NON_PRESET)
    path = tmp_path / "custom.pt"
    torch.save(openai_state_from_hf(hf), path)
    ours = load_model(path)
    assert ours.config.vision.image_size == 96 and ours.config.text.context_length == 40
    assert ours.config.vision.heads == 3 and ours.config.text.heads == 2  # width // 64
    assert_parity(ours, hf, 96, context_length=40)


def test_native_round_trip_is_exact(tmp_path):
    model = create_model("tiny-test").eval()
    save_model(model, tmp_path / "m.safetensors")
    back = load_model(tmp_path / "m.safetensors")
    assert back.config == model.config
    for (k, a), (k2, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    save_model(model, tmp_path / "half.safetensors", dtype=torch.float16)
    half = load_model(tmp_path / "half.safetensors")
    assert next(half.parameters()).dtype == torch.float32
    assert (tmp_path / "half.safetensors").stat().st_size < 0.6 * (tmp_path / "m.safetensors").stat().st_size


def test_hf_export_round_trip(tmp_path):
    from transformers import CLIPModel

    hf = make_hf_clip(7, **NON_PRESET)
    ours = load_model(_saved(hf, tmp_path / "src"))
    save_hf(ours, tmp_path / "exported")
    reloaded = CLIPModel.from_pretrained(tmp_path / "exported").eval()
    assert_parity(ours, reloaded, 96, context_length=40)
    # and our loader reads its own export back identically
    again = load_model(tmp_path / "exported")
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def _saved(hf, folder):
    hf.save_pretrained(folder)
    return folder


def test_errors_name_file_and_key(tmp_path):
    bogus = tmp_path / "notes.pt"
    bogus.write_text("this is not a checkpoint")
    with pytest.raises(CheckpointError, match=re.escape(str(bogus))):
        load_model(bogus)
    with pytest.raises(CheckpointError, match="no such file"):
        load_model(tmp_path / "missing.pt")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(empty_dir)
    # a native file whose tensor does not fit its recorded config names the key
    model = create_model("tiny-test")
    save_model(model, tmp_path / "ok.safetensors")
    cfg_json = model.config.to_json()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["visual.proj"] = torch.zeros(64, 16)
    save_file(state, str(tmp_path / "bad.safetensors"), metadata={"clip_etl_config": cfg_json})
    with pytest.raises(CheckpointError, match=r"shape mismatch for key 'visual.proj'"):
        load_model(tmp_path / "bad.safetensors")
    # a state dict of something else
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="missing key"):
        load_model(tmp_path / "other.pt")


def test_load_state_is_openai_named(hf_b32_dir):
    cfg, state = load_state(hf_b32_dir)
    assert "visual.transformer.resblocks.11.attn.in_proj_weight" in state
    assert state["visual.transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * 768, 768)
    assert not any("position_ids" in k for k in state)


def test_loading_builds_on_meta_without_initialising(tmp_path):
    """A checkpoint load skips random init (its weights replace it): no seconds spent on it and no
    torch._dynamo import (which nn.init pulls in). A fresh model keeps OpenAI's seeded init, pinned
    by its fingerprint, so the skip cannot change what ``create_model`` builds."""
    from clip_core.checkpoints import model_fingerprint

    torch.manual_seed(0)
    model = create_model("tiny-test")
    assert model_fingerprint(model) == "aec96d6b6845b708"
    save_model(model, tmp_path / "m.safetensors")
    probe = (
        "import sys, torch\n"
        "from clip_core import load_model\n"
        "from clip_core.checkpoints import model_fingerprint\n"
        f"m = load_model({str(tmp_path / 'm.safetensors')!r})\n"
        "print(model_fingerprint(m), next(m.parameters()).device, 'torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == [model_fingerprint(model), "cpu", "False"]
