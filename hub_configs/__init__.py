"""Ready adapter configs ("presets") for peft-ext's methods on common backbone families.

Each preset is one JSON file in this folder (``<name>.json``) holding the keyword arguments of a config class plus its
``peft_type``, so it loads through PEFT's own machinery::

    >>> import peft_ext
    >>> from peft_ext.hub_configs import list_presets, load_preset
    >>> config = load_preset("resora-bert", task_type="SEQ_CLS", modules_to_save=["classifier"])
    >>> model = peft.get_peft_model(base, config)

or, without this helper, ``PeftConfig.from_peft_type(**json.load(open(path)))`` (PEFT's own loader picks the class
from ``peft_type``; ``PeftConfig.from_pretrained`` does the same for a folder holding it as ``adapter_config.json``),
and on the command line ``peft-ext continual --method resora --method-config resora-bert``.

Names are ``<method>-<family>``; the families and the modules each method adapts:

================  ===================================  ================================  ==============================
family            models (transformers classes)        ReSoRA / AnA (attention)          MoE-CL (beside the block MLP)
================  ===================================  ================================  ==============================
bert              BERT, RoBERTa, XLM-R, MiniLM          query, key, value, attn out dense  ``layer.N.output`` (residual)
vit               ViT (4.x and 5.x module names)       q/k/v/o projections               ``layers.N.mlp``
clip-vision       CLIP image tower (alone or in CLIP)  q/k/v/out_proj of vision_model    vision_model ``layers.N.mlp``
clip-text         CLIP text tower (alone or in CLIP)   q/k/v/out_proj of text_model      text_model ``layers.N.mlp``
llama             Llama, Mistral, Qwen2 decoders       q/k/v/o_proj                      ``layers.N.mlp``
gpt2              GPT-2 (Conv1D)                       c_attn, attn.c_proj               ``h.N.mlp``
blip2-qformer     BLIP-2 Q-Former                      self/cross q/k/v + attn out dense  ``layer.N.output_query``
================  ===================================  ================================  ==============================

The CLIP tower presets adapt one tower inside a ``CLIPModel``; transformers 5 builds a standalone
``CLIPVisionModel``/``CLIPTextModel`` without the tower prefix, where both match (they differ in ``routing_token``:
the CLS token for images, the last (EOS) token for text). The ViT presets match both the 4.x (``encoder.layer.N``)
and the 5.x (``layers.N``) module names; the other families are named alike in both.

Paper presets: ``moecl-paper-mtil`` (MoE-Adapters4CL's MTIL setting on both towers of CLIP ViT-B/16) and
``ana-paper-pathweave`` (PathWeave's placement on BLIP-2: gated AnA in the Q-Former's attention, plain per-task
adapters summed on the projection into the LLM; ``docs/pathweave.md``).

:func:`preset_info` describes every preset from its own JSON through the method's registration
(``peft_ext.registry.MethodInfo.describe``), so the catalogue cannot disagree with the files.

``tests/test_presets.py`` builds a tiny model of every family from its transformers config and applies every preset
to it, checking the adapted module names, so a misspelled target fails there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


PRESET_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class PresetInfo:
    """What a preset is for: ``families`` it applies to (see the module docstring) and a one-line ``description``."""

    name: str
    method: str
    families: tuple[str, ...]
    description: str


FAMILIES: dict[str, str] = {
    "bert": "BERT-style encoders (BERT, RoBERTa, XLM-RoBERTa, MiniLM)",
    "vit": "ViT image encoders",
    "clip-vision": "the image tower of CLIP (CLIPVisionModel or inside CLIPModel)",
    "clip-text": "the text tower of CLIP (CLIPTextModel or inside CLIPModel)",
    "clip": "both towers of a CLIPModel",
    "llama": "Llama-style decoders (Llama, Mistral, Qwen2)",
    "gpt2": "GPT-2 (Conv1D projections)",
    "blip2-qformer": "BLIP-2's Q-Former (Blip2QFormerModel)",
    "blip2": "BLIP-2 / InstructBLIP (the Q-Former and the projection into the LLM)",
}

# paper preset -> (the families it applies to, the setting it reproduces)
_PAPER = {
    "moecl-paper-mtil": (("clip",), "MoE-Adapters4CL's MTIL setting"),
    "ana-paper-pathweave": (("blip2",), "PathWeave's placement"),
}


def preset_path(name: str) -> Path:
    """Path of preset ``name``'s JSON file; ``ValueError`` naming the close matches if there is none."""
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        import difflib

        close = difflib.get_close_matches(name, list_presets(), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"Unknown preset {name!r}.{hint} (see peft_ext.hub_configs.list_presets())")
    return path


def list_presets(method: str | None = None) -> list[str]:
    """Sorted names of the shipped presets, optionally only those of ``method`` (``resora``, ``ana``, ``moecl``)."""
    names = sorted(p.stem for p in PRESET_DIR.glob("*.json"))
    if method is not None:
        names = [n for n in names if n.split("-", 1)[0] == method]
    return names


def preset_info(name: str) -> PresetInfo:
    """Method, families and description of preset ``name``; the description is read from the preset itself."""
    from peft_ext.registry import method_info

    method, family = name.split("-", 1)
    families, setting = _PAPER.get(name, ((family,), None))
    if any(f not in FAMILIES for f in families):
        raise ValueError(f"Preset {name!r} is not named <method>-<family> and has no catalogue entry.")
    info = method_info(method)
    settings = f" ({info.describe(load_preset(name))})" if info.describe else ""
    where = " and ".join(FAMILIES[f] for f in families)
    description = f"{info.display_name}{settings} on {where}."
    return PresetInfo(name, method, families, f"{setting}: {description}" if setting else description)


def preset_dict(name: str) -> dict[str, Any]:
    """The raw JSON content of preset ``name`` (a fresh dict: config keyword arguments plus ``peft_type``)."""
    return json.loads(preset_path(name).read_text(encoding="utf-8"))


def load_preset(name: str, **overrides: Any):
    """Build the config of preset ``name``: an instance of the method's config class (e.g. ``MoECLConfig``).

    ``overrides`` replace or add config fields (``task_type``, ``modules_to_save``, ``r``, ...). Importing
    :mod:`peft_ext` registers the methods, so the class is found through PEFT's ``PeftConfig.from_peft_type``.
    An unknown field raises ``ValueError`` (PEFT's loader would only warn and drop it); bad values fail in the
    class's ``__post_init__``.
    """
    from peft import PeftConfig
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    import peft_ext  # noqa: F401  (registers RESORA/ANA/MOECL with PEFT)

    kwargs = {**preset_dict(name), **overrides}
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[kwargs["peft_type"]]
    unknown = sorted(set(kwargs) - {f.name for f in fields(config_cls)})
    if unknown:
        raise ValueError(f"Unknown {config_cls.__name__} field(s) {unknown} for preset {name!r}.")
    return PeftConfig.from_peft_type(**kwargs)


__all__ = [
    "FAMILIES",
    "PRESET_DIR",
    "PresetInfo",
    "list_presets",
    "load_preset",
    "preset_dict",
    "preset_info",
    "preset_path",
]
