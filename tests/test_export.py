"""Export directories: ONNX / int8 / TorchScript graphs that load alone and compute what the model does."""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F

from clip_core import CLIPConfig, create_model, save_model
from clip_core.encoders import load_encoder
from clip_core.export import (
    ExportError,
    add_export_arguments,
    eot_positions,
    export,
    export_model,
    is_export_dir,
    read_export_config,
    run_export,
)


TEXTS = ["a photo of a cat", "a red square on a dark background, slightly rotated", "x", "two dogs"]


@pytest.fixture(scope="session")
def tiny_model():
    torch.manual_seed(0)
    return create_model("tiny-test").eval()


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_model(tiny_model, path)
    return path


@pytest.fixture(scope="session")
def exports(tiny_ckpt, tmp_path_factory):
    """One export directory per format, made through the public ``export`` entry point."""
    root = tmp_path_factory.mktemp("exports")
    return {fmt: export(tiny_ckpt, root / fmt, fmt) for fmt in ("onnx", "onnx-int8", "torchscript")}


def pixels(n: int, r: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, r, r, generator=torch.Generator().manual_seed(seed))


def torch_reference(model, px=None, texts=None):
    enc = load_encoder(model, "torch", "fp32")
    return enc.encode_images(px) if px is not None else enc.encode_texts(texts)


def test_directory_is_self_describing(exports, tiny_model):
    for fmt, folder in exports.items():
        assert is_export_dir(folder)
        doc = read_export_config(folder)
        assert doc["backend"] == fmt
        assert CLIPConfig.from_dict(doc["model"]) == tiny_model.config
        assert doc["preprocess"]["image_size"] == 32 and len(doc["preprocess"]["mean"]) == 3
        assert (folder / doc["tokenizer"]["vocabulary"]).is_file()
        assert doc["source"]["fingerprint"] and doc["fingerprint"] != doc["source"]["fingerprint"]
        assert doc["logit_scale"] == pytest.approx(float(tiny_model.logit_scale.detach().exp()))
    assert read_export_config(exports["onnx-int8"])["precision"] == "int8"


def test_onnx_checker_passes_and_graphs_have_dynamic_axes(exports):
    folder = exports["onnx"]
    for name, dims in (("image.onnx", ["batch", 3, 32, 32]), ("text.onnx", ["batch", "sequence"])):
        model = onnx.load(str(folder / name))
        onnx.checker.check_model(model)
        shape = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
        assert shape == dims
        assert model.opset_import[0].version >= 17


def test_text_graph_finds_eot_by_comparison(exports):
    """An Equal against the EOT id feeds the pooling ArgMax (no argmax over raw ids on the EOT path)."""
    model = onnx.load(str(exports["onnx"] / "text.onnx"))
    consts = {}
    for node in model.graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    for init in model.graph.initializer:
        consts[init.name] = onnx.numpy_helper.to_array(init)
    equals = [n for n in model.graph.node if n.op_type == "Equal"]
    assert any(any(i in consts and np.all(consts[i] == 49407) for i in n.input) for n in equals)


def test_eot_pooling_is_not_an_argmax_over_ids(tmp_path):
    """With an EOT id smaller than other ids, pooling must still land on EOT (ONNX == torch)."""
    torch.manual_seed(1)
    cfg = CLIPConfig.from_dict({"embed_dim": 16, "vision": {"image_size": 16, "patch_size": 8, "width": 32,
                                "layers": 1, "heads": 1},
                                "text": {"context_length": 12, "width": 32, "layers": 1, "heads": 1,
                                         "eot_token_id": 7, "vocab_size": 1000}})
    model = create_model(cfg).eval()
    tokens = torch.tensor([[6, 500, 900, 7, 0, 0], [6, 800, 7, 0, 0, 0]])
    assert eot_positions(tokens, 7).tolist() == [3, 2]
    folder = export_model(model, tmp_path / "x", "onnx")
    got = load_encoder(folder).encode_texts(tokens)
    with torch.no_grad():
        want = F.normalize(model.encode_text(tokens), dim=-1).numpy()
    assert np.abs(got - want).max() <= 1e-5


def test_onnx_matches_torch_fp32(exports, tiny_model):
    enc = load_encoder(exports["onnx"])
    assert (enc.backend, enc.precision) == ("onnx", "fp32")
    px = pixels(5)
    assert np.abs(enc.encode_images(px) - torch_reference(tiny_model, px=px)).max() <= 1e-4
    assert np.abs(enc.encode_texts(TEXTS) - torch_reference(tiny_model, texts=TEXTS)).max() <= 1e-4


def test_onnx_text_trimming_is_exact(exports):
    enc = load_encoder(exports["onnx"])
    trimmed = enc.encode_texts(TEXTS * 5)  # 20 rows: several length buckets
    enc.trim_text = False
    full = enc.encode_texts(TEXTS * 5)
    assert np.abs(trimmed - full).max() <= 1e-6


@pytest.mark.parametrize("fmt", ["onnx", "onnx-int8", "torchscript"])
def test_dynamic_batch_sizes(exports, fmt):
    enc = load_encoder(exports[fmt])
    whole_img = enc.encode_images(pixels(8))
    whole_txt = enc.encode_texts((TEXTS * 2)[:8])
    for n in (1, 3, 8):
        img = enc.encode_images(pixels(8)[:n])
        txt = enc.encode_texts((TEXTS * 2)[:n])
        assert img.shape == (n, 32) and txt.shape == (n, 32)
        tol = 5e-2 if fmt == "onnx-int8" else 1e-5  # int8 activation ranges are per batch
        assert np.abs(img - whole_img[:n]).max() <= tol
        assert np.abs(txt - whole_txt[:n]).max() <= tol


def test_torchscript_loads_and_matches(exports, tiny_model):
    enc = load_encoder(exports["torchscript"], backend="torchscript")
    assert (enc.backend, enc.precision) == ("torchscript", "fp32")
    px = pixels(3)
    assert np.abs(enc.encode_images(px) - torch_reference(tiny_model, px=px)).max() <= 1e-5
    assert np.abs(enc.encode_texts(TEXTS) - torch_reference(tiny_model, texts=TEXTS)).max() <= 1e-5


def test_int8_graphs_are_quantized(exports):
    doc = read_export_config(exports["onnx-int8"])
    ops = {n.op_type for n in onnx.load(str(exports["onnx-int8"] / doc["graphs"]["image"])).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}
    assert "per-channel" in doc["details"]["quantization"]["image"]


def test_directory_is_self_contained(exports, tmp_path):
    """Copied elsewhere (the checkpoint gone from view), it loads and gives the same numbers."""
    for fmt, folder in exports.items():
        copy = tmp_path / f"copy-{fmt}"
        shutil.copytree(folder, copy)
        a, b = load_encoder(folder), load_encoder(copy)
        assert a.fingerprint == b.fingerprint
        np.testing.assert_array_equal(a.encode_images(pixels(2)), b.encode_images(pixels(2)))
        np.testing.assert_array_equal(a.encode_texts(TEXTS), b.encode_texts(TEXTS))


def test_backend_must_match_the_directory(exports):
    with pytest.raises(ValueError, match="holds a 'onnx' export"):
        load_encoder(exports["onnx"], backend="onnx-int8")
    assert load_encoder(exports["onnx"], backend="onnx").backend == "onnx"


def test_incomplete_or_occupied_directories_are_errors(exports, tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exports["onnx"], broken)
    (broken / "text.onnx").unlink()
    with pytest.raises(ExportError, match="missing text.onnx"):
        read_export_config(broken)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("keep me")
    with pytest.raises(ExportError, match="not an empty directory"):
        export_model(tiny_model, occupied, "onnx")
    with pytest.raises(ExportError, match="unknown export format"):
        export_model(tiny_model, tmp_path / "y", "tflite")


def test_large_graphs_keep_weights_in_a_side_file(tiny_model, tmp_path, monkeypatch):
    """Graphs over protobuf's 2 GB limit need external data; forced here by lowering the threshold."""
    import clip_core.export as export_mod

    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_THRESHOLD", 10_000)
    folder = export_model(tiny_model, tmp_path / "big", "onnx")
    assert (folder / "image.onnx.data").is_file() and (folder / "image.onnx").stat().st_size < 1_000_000
    px = pixels(2)
    assert np.abs(load_encoder(folder).encode_images(px) - torch_reference(tiny_model, px=px)).max() <= 1e-4


def test_static_int8_with_calibration_images(tiny_model, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    cal = tmp_path / "cal"
    cal.mkdir()
    for i in range(6):
        yy, xx = np.mgrid[0:40, 0:48]
        img = np.stack([xx * 5, yy * 6, (xx + yy) * 2], -1) + rng.normal(0, 10, (40, 48, 3))
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(cal / f"{i}.png")
    folder = export_model(tiny_model, tmp_path / "static", "onnx-int8", calibration_images=cal)
    doc = read_export_config(folder)
    assert doc["details"]["quantization"]["image"].startswith("static/")
    dynamic = export_model(tiny_model, tmp_path / "dynamic", "onnx-int8")
    assert doc["fingerprint"] != read_export_config(dynamic)["fingerprint"]
    px = pixels(4)
    cos = (load_encoder(folder).encode_images(px) * torch_reference(tiny_model, px=px)).sum(1)
    assert cos.min() > 0.9
    with pytest.raises(ExportError, match="no calibration images"):
        export_model(tiny_model, tmp_path / "none", "onnx-int8", calibration_images=tmp_path / "missing*.png")


def test_cli_glue(tiny_ckpt, tmp_path, capsys):
    parser = add_export_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--model", str(tiny_ckpt), "--format", "onnx", "--out", str(tmp_path / "cli")])
    assert run_export(args) == 0
    err = capsys.readouterr().err
    assert "[export]" in err and "wrote" in err
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["backend"] == "onnx"

    args = parser.parse_args(["--model", str(tmp_path / "nope.pt"), "--format", "onnx", "--out", str(tmp_path / "z")])
    assert run_export(args) == 1
    err_lines = [l for l in capsys.readouterr().err.splitlines() if "error" in l]
    assert len(err_lines) == 1 and "nope.pt" in err_lines[0]
    with pytest.raises(SystemExit):
        parser.parse_args(["--model", "demo", "--format", "tflite", "--out", "x"])


def test_scattered_external_data_is_merged_into_one_file(exports, tmp_path):
    """The exporter writes a >2 GB graph with one file per tensor; the directory keeps one side file."""
    from clip_core.export import _consolidate_external_data

    proto = onnx.load(str(exports["onnx"] / "image.onnx"))
    path = tmp_path / "image.onnx"
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=1024)
    assert len(list(tmp_path.iterdir())) > 3
    _consolidate_external_data(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.onnx", "image.onnx.data"]
    onnx.checker.check_model(str(path))
