"""Class names and prompt templates for zero-shot classification.

Zero-shot accuracy depends as much on the prompts as on the weights, so the prompt sets OpenAI
published are shipped with the package and can be named instead of copied around:

- ``"seed"``: the nine templates the original classifier used (the default);
- ``"imagenet"``: OpenAI's 1000 ImageNet class names and 80 templates;
- a dataset from OpenAI's per-dataset prompt file (``"CIFAR10"``, ``"Food101"``, ...).

Users may also pass their own lists or point at a file. Every template is validated up front,
because a template with no ``{}`` (or two) silently produces identical prompts for every class.
"""

from __future__ import annotations

import ast
import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Sequence, Union

ASSETS_DIR = Path(__file__).parent / "assets"
IMAGENET_PROMPTS = ASSETS_DIR / "imagenet_prompts.json"
OPENAI_PROMPTS = ASSETS_DIR / "openai-clip-prompts.md"

# The templates the original zero-shot classifier ensembled; kept as the default.
SEED_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
)

PathLike = Union[str, os.PathLike]
TemplateSpec = Union[None, str, PathLike, Sequence[str]]
ClassSpec = Union[str, PathLike, Sequence[str]]


class PromptError(ValueError):
    """A prompt set that cannot be resolved or is malformed; the message says which and why."""


# --------------------------------------------------------------------------------------------
# Bundled sets
# --------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _imagenet() -> dict:
    with open(IMAGENET_PROMPTS, encoding="utf-8") as f:
        return json.load(f)


def imagenet_classes() -> list[str]:
    """OpenAI's cleaned-up 1000 ImageNet class names (better than the WordNet synset names)."""
    return list(_imagenet()["classes"])


def imagenet_templates() -> list[str]:
    """OpenAI's 80 ImageNet templates."""
    return list(_imagenet()["templates"])


_BLOCK_RE = re.compile(r"^##\s+(?P<name>[^\n]+?)\s*$(?P<body>.*?)(?=^##\s|\Z)", re.M | re.S)
_LIST_RE = re.compile(r"^(?P<var>classes|templates)\s*=\s*(?P<list>\[.*?^\])", re.M | re.S)


@lru_cache(maxsize=1)
def _openai_datasets() -> dict[str, tuple[list, list[str]]]:
    """Parse OpenAI's markdown prompt file: one ``## Name`` section per dataset, each holding
    python-literal ``classes = [...]`` and ``templates = [...]`` lists (parsed with
    ``ast.literal_eval``, never executed)."""
    text = OPENAI_PROMPTS.read_text(encoding="utf-8")
    datasets: dict[str, tuple[list, list[str]]] = {}
    for block in _BLOCK_RE.finditer(text):
        found: dict[str, list] = {}
        for m in _LIST_RE.finditer(block.group("body")):
            try:
                found[m.group("var")] = ast.literal_eval(m.group("list"))
            except (ValueError, SyntaxError) as e:
                raise PromptError(
                    f"{OPENAI_PROMPTS.name}: cannot parse {m.group('var')} of {block.group('name')!r}: {e}"
                ) from e
        if "classes" in found and "templates" in found:
            datasets[block.group("name")] = (found["classes"], found["templates"])
    return datasets


def openai_dataset_names() -> list[str]:
    """Names of the datasets in OpenAI's prompt file, as spelled there."""
    return list(_openai_datasets())


def _find_dataset(name: str) -> str | None:
    wanted = name.strip().lower()
    for key in _openai_datasets():
        if key.lower() == wanted:
            return key
    return None


def openai_dataset_prompts(name: str, *, synonyms: bool = False) -> tuple[list, list[str]]:
    """``(classes, templates)`` OpenAI used for dataset ``name`` (case-insensitive).

    A few datasets (FacialEmotionRecognition2013) give several names for one class. By default
    each class is its first name, so labels are plain strings; with ``synonyms=True`` every class
    is a list of names, which :class:`~clip_core.zero_shot.ZeroShotClassifier` also accepts (it
    then averages over names x templates, as OpenAI did).
    """
    key = _find_dataset(name)
    if key is None:
        raise PromptError(
            f"unknown prompt dataset {name!r}; available: imagenet, " + ", ".join(openai_dataset_names())
        )
    classes, templates = _openai_datasets()[key]
    groups = [[c] if isinstance(c, str) else list(c) for c in classes]
    out = groups if synonyms else [g[0] for g in groups]
    return out, validate_templates(templates, source=f"{OPENAI_PROMPTS.name}#{key}")


# --------------------------------------------------------------------------------------------
# Validation and resolution of user specs
# --------------------------------------------------------------------------------------------
def validate_templates(templates: Sequence[str], source: str = "templates") -> list[str]:
    """Check that ``templates`` is a non-empty list of strings, each with exactly one ``{}``.

    ``str.format`` would accept a template without a placeholder and give the same prompt for
    every class, so this is an error rather than a surprise in the accuracy numbers.
    """
    if isinstance(templates, (str, bytes)) or not isinstance(templates, Sequence):
        raise PromptError(f"{source}: expected a list of template strings, got {type(templates).__name__}")
    out = list(templates)
    if not out:
        raise PromptError(f"{source}: no templates")
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise PromptError(f"{source}: template {i} is {type(t).__name__}, not a string")
        n = t.count("{}")
        if n != 1:
            raise PromptError(f"{source}: template {i} {t!r} must contain exactly one '{{}}' (found {n})")
        try:
            t.format("x")
        except (IndexError, KeyError, ValueError) as e:
            raise PromptError(f"{source}: template {i} {t!r} is not a valid format string: {e}") from e
    return out


def _read_lines(path: Path) -> list[str]:
    """One entry per line; blank lines and ``#`` comments are ignored."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def _read_list_file(path: Path, key: str) -> list:
    """A JSON file (a list, or an object with ``key``) or a plain text file, one item a line."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}: invalid JSON: {e}") from e
        if isinstance(data, dict):
            if key not in data:
                raise PromptError(f"{path}: JSON object has no {key!r} key")
            data = data[key]
        if not isinstance(data, list):
            raise PromptError(f"{path}: expected a JSON list of {key}")
        return data
    return _read_lines(path)


def _as_path(spec: object) -> Path | None:
    if isinstance(spec, os.PathLike):
        return Path(spec)
    if isinstance(spec, str) and (os.sep in spec or "/" in spec or Path(spec).suffix):
        return Path(os.path.expanduser(spec))
    return None


def demo_prompts() -> dict:
    """The bundled demo model's prompt set: ``classes``, ``templates`` and a ``caption`` vocabulary."""
    path = Path(__file__).parent / "assets" / "demo_prompts.json"
    if not path.is_file():
        raise PromptError(f"the demo prompt set is missing from the package: {path}")
    return json.loads(path.read_text())


def resolve_templates(spec: TemplateSpec = None) -> list[str]:
    """Templates from a spec: ``None``/``"seed"`` (the 9 seed templates), ``"imagenet"``/
    ``"openai-imagenet"`` (80), an OpenAI dataset name, a list of strings, or a path to a text
    file (one template a line) or JSON file (a list, or ``{"templates": [...]}``)."""
    if spec is None:
        return list(SEED_TEMPLATES)
    if isinstance(spec, (str, os.PathLike)):
        name = str(spec).strip().lower() if isinstance(spec, str) else ""
        if name == "seed":
            return list(SEED_TEMPLATES)
        if name == "demo":
            return validate_templates(demo_prompts()["templates"], source="demo prompts")
        if name in ("imagenet", "openai-imagenet"):
            return imagenet_templates()
        if isinstance(spec, str) and _find_dataset(spec) is not None:
            return openai_dataset_prompts(spec)[1]
        path = _as_path(spec)
        if path is None and isinstance(spec, str) and Path(spec).is_file():
            path = Path(spec)
        if path is not None and path.is_file():
            return validate_templates(_read_list_file(path, "templates"), source=str(path))
        if path is not None:
            raise PromptError(f"template file not found: {path}")
        raise PromptError(
            f"unknown template set {spec!r}; use 'seed', 'imagenet', a file path, a list, or one of: "
            + ", ".join(openai_dataset_names())
        )
    return validate_templates(spec)


def _validate_classes(classes: Sequence, source: str) -> list[str]:
    if isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence):
        raise PromptError(f"{source}: expected a list of class names, got {type(classes).__name__}")
    out = []
    for i, c in enumerate(classes):
        if not isinstance(c, str) or not c.strip():
            raise PromptError(f"{source}: class {i} ({c!r}) must be a non-empty string")
        out.append(c.strip())
    if not out:
        raise PromptError(f"{source}: no classes")
    dupes = sorted({c for c in out if out.count(c) > 1})
    if dupes:
        raise PromptError(f"{source}: duplicate class names: {', '.join(dupes[:10])}")
    return out


def resolve_classes(spec: ClassSpec) -> list[str]:
    """Class names from a spec: a list of strings, ``"imagenet"``, an OpenAI dataset name, or a
    path to a text file (one class a line; blank lines and ``#`` comments ignored) or a JSON
    file (a list, or ``{"classes": [...]}``). Duplicates are an error: two identical labels
    would split the probability mass of one class."""
    if spec is None:
        raise PromptError("no classes given")
    if isinstance(spec, (str, os.PathLike)):
        if isinstance(spec, str):
            name = spec.strip().lower()
            if name in ("imagenet", "openai-imagenet"):
                return imagenet_classes()
            if name == "demo":
                return _validate_classes(demo_prompts()["classes"], source="demo prompts")
            if _find_dataset(spec) is not None:
                return openai_dataset_prompts(spec)[0]
        path = _as_path(spec)
        if path is None and isinstance(spec, str) and Path(spec).is_file():
            path = Path(spec)
        if path is not None and path.is_file():
            return _validate_classes(_read_list_file(path, "classes"), source=str(path))
        if path is not None:
            raise PromptError(f"class file not found: {path}")
        raise PromptError(
            f"unknown class set {spec!r}; use 'imagenet', a file path, a list, or one of: "
            + ", ".join(openai_dataset_names())
        )
    return _validate_classes(spec, source="classes")
