"""clip_core: a from-scratch CLIP that loads OpenAI, open_clip and Hugging Face checkpoints.

Depends on torch, numpy and pillow only (plus ftfy/regex for the tokenizer), so it works in a
notebook without Ray. Importing the package imports no torch: the numpy-only modules
(``zero_shot``'s helpers, ``prompts``) are used by the index build's Ray tasks, which should not
pay torch's import time and memory.
"""

from .config import CLIPConfig, TextConfig, VisionConfig, get_model_config, list_models

__all__ = [
    "CLIP",
    "CLIPConfig",
    "TextConfig",
    "VisionConfig",
    "create_model",
    "get_model_config",
    "list_models",
    "load_model",
    "save_model",
    "save_hf",
    "tokenize",
    "image_transform",
    "load_image",
]


def __getattr__(name):  # lazy: keep `import clip_core` light and free of torch and optional modules
    if name in ("CLIP", "create_model"):
        from . import model

        return getattr(model, name)
    if name in ("load_model", "save_model", "save_hf"):
        from . import checkpoints

        return getattr(checkpoints, name)
    if name == "tokenize":
        from .tokenizer import tokenize

        return tokenize
    if name in ("image_transform", "load_image"):
        from . import preprocess

        return getattr(preprocess, name)
    raise AttributeError(name)
