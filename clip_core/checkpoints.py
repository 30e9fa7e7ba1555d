"""Load any CLIP checkpoint users already hold; save ours natively and in Hugging Face layout.

Supported inputs, detected from the file itself (never from its name alone):

- OpenAI ``.pt``: a TorchScript archive (only its state dict is read) or a plain state dict.
  fp16 weights are upcast; the ``input_resolution``/``context_length``/``vocab_size`` entries
  are dropped. The architecture is inferred from tensor shapes, as OpenAI's ``build_model`` does
  (attention heads = width // 64, OpenAI's convention).
- open_clip files (``.pt``/``.bin``/``.safetensors``), optionally wrapped in ``state_dict`` and
  prefixed ``module.``. open_clip uses OpenAI's names. The activation cannot be read off the
  weights: an ``open_clip_config.json`` beside the file decides it (``quick_gelu`` or not),
  otherwise the ``activation`` argument, otherwise OpenAI's QuickGELU.
- A Hugging Face ``CLIPModel`` folder (``config.json`` + ``model.safetensors`` or
  ``pytorch_model.bin``), mapped through :data:`HF_KEY_TABLE`; ``hidden_act`` is honoured.
- Our native format: one ``.safetensors`` whose metadata holds the ``CLIPConfig`` as JSON.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path
from typing import Mapping

import torch

from .config import CLIPConfig, TextConfig, VisionConfig
from .model import CLIP

NATIVE_METADATA_KEY = "clip_etl_config"
NATIVE_FORMAT_KEY = "format"
NATIVE_FORMAT = "clip-etl/1"

OPENAI_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")

ASSETS_DIR = Path(__file__).parent / "assets"
# Names that resolve to checkpoints shipped inside the package.
BUNDLED_CHECKPOINTS = {"demo": ASSETS_DIR / "demo-model.safetensors"}


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A bundled name (``demo``) or a path; ``~`` is expanded."""
    if isinstance(path, str) and path in BUNDLED_CHECKPOINTS:
        return BUNDLED_CHECKPOINTS[path]
    return Path(os.path.expanduser(str(path)))


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


# --------------------------------------------------------------------------------------------
# Hugging Face <-> OpenAI names. One table of (HF pattern, our name); q/k/v and the two
# projections need reshaping and are handled next to it.
# --------------------------------------------------------------------------------------------
HF_KEY_TABLE: list[tuple[str, str]] = [
    (r"vision_model\.embeddings\.patch_embedding\.weight", "visual.conv1.weight"),
    (r"vision_model\.embeddings\.class_embedding", "visual.class_embedding"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "visual.positional_embedding"),
    (r"vision_model\.pre_layrnorm\.(weight|bias)", r"visual.ln_pre.\1"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"visual.ln_post.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.", r"visual.transformer.resblocks.\1."),
    (r"text_model\.embeddings\.token_embedding\.weight", "token_embedding.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", "positional_embedding"),
    (r"text_model\.final_layer_norm\.(weight|bias)", r"ln_final.\1"),
    (r"text_model\.encoder\.layers\.(\d+)\.", r"transformer.resblocks.\1."),
    (r"self_attn\.out_proj\.", "attn.out_proj."),
    (r"layer_norm1\.", "ln_1."),
    (r"layer_norm2\.", "ln_2."),
    (r"mlp\.fc1\.", "mlp.c_fc."),
    (r"mlp\.fc2\.", "mlp.c_proj."),
    (r"^logit_scale$", "logit_scale"),
]
HF_TRANSPOSED = {"visual_projection.weight": "visual.proj", "text_projection.weight": "text_projection"}
HF_IGNORED = re.compile(r"(^|\.)position_ids$")
HF_QKV = re.compile(r"^(.*)\.self_attn\.([qkv])_proj\.(weight|bias)$")


def hf_to_openai(state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ``CLIPModel`` state dict to OpenAI's names (merging q/k/v)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if HF_IGNORED.search(key):
            continue
        if key in HF_TRANSPOSED:
            out[HF_TRANSPOSED[key]] = value.t().contiguous()
            continue
        m = HF_QKV.match(key)
        if m:
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = value
            continue
        new = key
        for pattern, repl in HF_KEY_TABLE:
            new = re.sub(pattern, repl, new)
        if new == key and key != "logit_scale":
            raise CheckpointError(f"{source}: unexpected Hugging Face key {key!r}")
        out[new] = value
    for (prefix, kind), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{source}: incomplete q/k/v projections under {prefix!r}")
        name = prefix + "."
        for pattern, repl in HF_KEY_TABLE:
            name = re.sub(pattern, repl, name)
        out[f"{name}attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def openai_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`hf_to_openai`, for :func:`save_hf`."""
    out: dict[str, torch.Tensor] = {}
    inverse_simple = {
        "visual.conv1.weight": "vision_model.embeddings.patch_embedding.weight",
        "visual.class_embedding": "vision_model.embeddings.class_embedding",
        "visual.positional_embedding": "vision_model.embeddings.position_embedding.weight",
        "token_embedding.weight": "text_model.embeddings.token_embedding.weight",
        "positional_embedding": "text_model.embeddings.position_embedding.weight",
        "logit_scale": "logit_scale",
    }
    block_names = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.",
                   "mlp.c_proj.": "mlp.fc2.", "attn.out_proj.": "self_attn.out_proj."}
    for key, value in state.items():
        value = value.contiguous()
        if key in inverse_simple:
            out[inverse_simple[key]] = value
        elif key in ("visual.proj", "text_projection"):
            name = "visual_projection.weight" if key == "visual.proj" else "text_projection.weight"
            out[name] = value.t().contiguous()
        elif m := re.match(r"^visual\.ln_(pre|post)\.(weight|bias)$", key):
            out[f"vision_model.{'pre_layrnorm' if m.group(1) == 'pre' else 'post_layernorm'}.{m.group(2)}"] = value
        elif m := re.match(r"^ln_final\.(weight|bias)$", key):
            out[f"text_model.final_layer_norm.{m.group(1)}"] = value
        elif m := re.match(r"^(visual\.)?transformer\.resblocks\.(\d+)\.(.*)$", key):
            tower = "vision_model" if m.group(1) else "text_model"
            prefix, rest = f"{tower}.encoder.layers.{m.group(2)}.", m.group(3)
            if rest.startswith("attn.in_proj_"):
                kind = rest.rsplit("_", 1)[1]
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}_proj.{kind}"] = part.contiguous()
                continue
            for ours, theirs in block_names.items():
                if rest.startswith(ours):
                    out[prefix + theirs + rest[len(ours):]] = value
                    break
            else:
                raise CheckpointError(f"cannot map key {key!r} to Hugging Face layout")
        else:
            raise CheckpointError(f"cannot map key {key!r} to Hugging Face layout")
    return out


# --------------------------------------------------------------------------------------------
# Architecture inference from an OpenAI-named state dict.
# --------------------------------------------------------------------------------------------
def _count_layers(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}resblocks\.(\d+)\.")
    layers = {int(m.group(1)) for k in state if (m := pattern.match(k))}
    return max(layers) + 1 if layers else 0


def infer_config(state: Mapping[str, torch.Tensor], source: str = "<state dict>", activation: str = "quick_gelu",
                 eps: float = 1e-5) -> CLIPConfig:
    """The architecture an OpenAI-named state dict encodes, read from tensor shapes."""
    required = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj", "token_embedding.weight",
                "positional_embedding", "text_projection", "ln_final.weight"]
    missing = [k for k in required if k not in state]
    if missing:
        if "visual.layer1.0.conv1.weight" in state:
            raise CheckpointError(f"{source}: ResNet CLIP checkpoints are not supported (ViT only)")
        raise CheckpointError(f"{source}: not a CLIP ViT state dict; missing key(s): {', '.join(missing)}")
    conv = state["visual.conv1.weight"]
    vision_width, patch = conv.shape[0], conv.shape[-1]
    grid = round((state["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = state["ln_final.weight"].shape[0]
    vision_mlp = state.get("visual.transformer.resblocks.0.mlp.c_fc.weight")
    text_mlp = state.get("transformer.resblocks.0.mlp.c_fc.weight")
    return CLIPConfig(
        embed_dim=state["text_projection"].shape[1],
        vision=VisionConfig(
            image_size=patch * grid,
            patch_size=patch,
            width=vision_width,
            layers=_count_layers(state, "visual.transformer."),
            heads=max(1, vision_width // 64),
            mlp_ratio=(vision_mlp.shape[0] / vision_width) if vision_mlp is not None else 4.0,
        ),
        text=TextConfig(
            context_length=state["positional_embedding"].shape[0],
            vocab_size=state["token_embedding.weight"].shape[0],
            width=text_width,
            layers=_count_layers(state, "transformer."),
            heads=max(1, text_width // 64),
            mlp_ratio=(text_mlp.shape[0] / text_width) if text_mlp is not None else 4.0,
        ),
        activation=activation,
        layer_norm_eps=eps,
    )


def config_from_hf(hf: dict, source: str = "config.json") -> CLIPConfig:
    """Our config from a Hugging Face ``CLIPConfig`` JSON document."""
    try:
        v, t = hf["vision_config"], hf["text_config"]
    except KeyError as e:
        raise CheckpointError(f"{source}: not a CLIPModel config (missing {e.args[0]!r})") from None
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
    if len(acts) != 1:
        raise CheckpointError(f"{source}: different activations per tower are not supported: {sorted(acts)}")
    act = acts.pop()
    if act not in ("quick_gelu", "gelu"):
        raise CheckpointError(f"{source}: unsupported hidden_act {act!r} (quick_gelu or gelu)")
    eps = {v.get("layer_norm_eps", 1e-5), t.get("layer_norm_eps", 1e-5)}
    if len(eps) != 1:
        raise CheckpointError(f"{source}: different layer_norm_eps per tower are not supported")
    return CLIPConfig(
        embed_dim=hf.get("projection_dim", 512),
        vision=VisionConfig(
            image_size=v.get("image_size", 224),
            patch_size=v.get("patch_size", 32),
            width=v.get("hidden_size", 768),
            layers=v.get("num_hidden_layers", 12),
            heads=v.get("num_attention_heads", 12),
            mlp_ratio=v.get("intermediate_size", 3072) / v.get("hidden_size", 768),
        ),
        text=TextConfig(
            context_length=t.get("max_position_embeddings", 77),
            vocab_size=t.get("vocab_size", 49408),
            width=t.get("hidden_size", 512),
            layers=t.get("num_hidden_layers", 12),
            heads=t.get("num_attention_heads", 8),
            mlp_ratio=t.get("intermediate_size", 2048) / t.get("hidden_size", 512),
            eot_token_id=t.get("eos_token_id", 49407) if t.get("eos_token_id", 49407) != 2 else 49407,
        ),
        activation=act,
        layer_norm_eps=eps.pop(),
    )


def config_to_hf(cfg: CLIPConfig) -> dict:
    """A Hugging Face ``CLIPConfig`` JSON document for our config."""
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": 2.6592,
        "initializer_factor": 1.0,
        "text_config": {
            "model_type": "clip_text_model",
            "hidden_size": t.width,
            "intermediate_size": int(t.width * t.mlp_ratio),
            "num_attention_heads": t.heads,
            "num_hidden_layers": t.layers,
            "max_position_embeddings": t.context_length,
            "vocab_size": t.vocab_size,
            "hidden_act": cfg.activation,
            "layer_norm_eps": cfg.layer_norm_eps,
            "projection_dim": cfg.embed_dim,
            "bos_token_id": 49406,
            "eos_token_id": t.eot_token_id,
            "pad_token_id": 1,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": v.width,
            "intermediate_size": int(v.width * v.mlp_ratio),
            "num_attention_heads": v.heads,
            "num_hidden_layers": v.layers,
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "num_channels": 3,
            "hidden_act": cfg.activation,
            "layer_norm_eps": cfg.layer_norm_eps,
            "projection_dim": cfg.embed_dim,
        },
    }


# --------------------------------------------------------------------------------------------
# Reading files.
# --------------------------------------------------------------------------------------------
def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.split("/", 1)[-1].startswith("code/") for n in z.namelist())


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{path}: not a readable .safetensors file ({e})") from e


def _read_torch_file(path: Path) -> dict[str, torch.Tensor]:
    if _is_torchscript(path):
        try:
            return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        except Exception as e:
            raise CheckpointError(f"{path}: TorchScript archive could not be read ({e})") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{path}: not a CLIP checkpoint (expected an OpenAI/open_clip .pt/.bin state dict, a TorchScript "
            f"archive, a .safetensors file or a Hugging Face folder): {type(e).__name__}: {str(e)[:200]}"
        ) from e
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors, found {type(obj).__name__}")
    return obj


def _strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _open_clip_activation(path: Path) -> str | None:
    sidecar = path.parent / "open_clip_config.json"
    if not sidecar.is_file():
        return None
    cfg = json.loads(sidecar.read_text())
    model_cfg = cfg.get("model_cfg", cfg)
    return "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"


def _is_hf_state(state: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("vision_model.", "text_model.")) for k in state)


def _build(cfg: CLIPConfig, state: dict[str, torch.Tensor], source: str) -> CLIP:
    state = {k: v for k, v in state.items() if k not in OPENAI_EXTRA_KEYS and not k.endswith("attn_mask")}
    with torch.device("meta"):  # no point initialising weights that are about to be replaced
        model = CLIP(cfg)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing key(s): {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected key(s): {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
        raise CheckpointError(f"{source}: state dict does not match the CLIP architecture; " + "; ".join(parts))
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(
                f"{source}: shape mismatch for key {key!r}: checkpoint has {tuple(value.shape)}, "
                f"model expects {tuple(expected[key].shape)}"
            )
    model.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, assign=True)
    return model.eval()


def load_state(path: str | os.PathLike, activation: str | None = None) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    """Read a checkpoint into (config, OpenAI-named float state dict) without building a model."""
    p = resolve_checkpoint(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such file or directory")
    if p.is_dir():
        return _load_hf_folder(p)
    if p.suffix == ".safetensors" or _looks_like_safetensors(p):
        state, metadata = _read_safetensors(p)
        if NATIVE_METADATA_KEY in metadata:
            cfg = CLIPConfig.from_json(metadata[NATIVE_METADATA_KEY])
            return cfg, state
    else:
        state = _read_torch_file(p)
    state = _strip_prefix(state)
    if _is_hf_state(state):
        config_path = p.parent / "config.json"
        state = hf_to_openai(state, str(p))
        if config_path.is_file():
            return config_from_hf(json.loads(config_path.read_text()), str(config_path)), state
    act = activation or _open_clip_activation(p) or "quick_gelu"
    return infer_config(state, str(p), activation=act), state


def _looks_like_safetensors(p: Path) -> bool:
    """A safetensors file starts with an 8-byte little-endian header size then a JSON '{'."""
    try:
        with open(p, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < 100_000_000


def _load_hf_folder(folder: Path) -> tuple[CLIPConfig, dict[str, torch.Tensor]]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{folder}: a directory, but not a Hugging Face CLIPModel folder (no config.json)")
    hf = json.loads(config_path.read_text())
    cfg = config_from_hf(hf, str(config_path))
    if (folder / "model.safetensors").is_file():
        state, _ = _read_safetensors(folder / "model.safetensors")
        source = folder / "model.safetensors"
    elif (folder / "pytorch_model.bin").is_file():
        source = folder / "pytorch_model.bin"
        state = _read_torch_file(source)
    else:
        raise CheckpointError(f"{folder}: Hugging Face folder without model.safetensors or pytorch_model.bin")
    return cfg, hf_to_openai(state, str(source))


def load_model(path: str | os.PathLike, *, activation: str | None = None) -> CLIP:
    """Load any supported checkpoint as a float32 CLIP in eval mode on the CPU.

    ``activation`` overrides the guess for files that do not record it (open_clip state dicts
    trained with plain GELU, e.g. LAION models, need ``activation="gelu"``).
    """
    cfg, state = load_state(path, activation=activation)
    if activation is not None and cfg.activation != activation:
        cfg.activation = activation
    return _build(cfg, state, str(path))


def save_model(model: CLIP, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write the native format: one ``.safetensors`` with the config in its metadata.

    ``dtype=torch.float16`` halves the file; loading always upcasts to float32.
    """
    from safetensors.torch import save_file

    state = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()
             for k, v in model.state_dict().items()}
    metadata = {NATIVE_METADATA_KEY: model.config.to_json(), NATIVE_FORMAT_KEY: NATIVE_FORMAT}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(state, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def save_hf(model: CLIP, folder: str | os.PathLike) -> None:
    """Write a Hugging Face ``CLIPModel`` folder (``config.json`` + ``model.safetensors``)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = openai_to_hf({k: v.detach().cpu().float() for k, v in model.state_dict().items()})
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")


def model_fingerprint(model: CLIP) -> str:
    """A stable hash of the architecture and weights (changes when any weight changes)."""
    import hashlib

    h = hashlib.sha256(model.config.to_json().encode())
    for key, value in sorted(model.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().float().contiguous().numpy())  # the buffer, without a copy
    return h.hexdigest()[:16]
