"""The CLIP model names ``--pretrained_clip_name`` accepts, and what each means; importing this needs no torch.

Command lines import it to list and check names before the heavy libraries load.
"""

from __future__ import annotations

# OpenAI's ViT weight files: where to fetch each and the file name it must have in ``modules/``.
OPENAI_MODEL_URLS: dict[str, str] = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/"
    "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/"
    "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
}
OPENAI_FILE_NAMES: dict[str, str] = {"ViT-B/32": "ViT-B-32.pt", "ViT-B/16": "ViT-B-16.pt"}

# Random, untrained architectures for demos and tests without a download. Never a stand-in for real weights.
# Text width 512 because the CLIP4Clip heads are 512 wide.
TINY_MODELS: dict[str, dict[str, int]] = {
    "tiny-random-ViT/16": dict(
        embed_dim=512,
        image_resolution=64,
        vision_layers=2,
        vision_width=128,
        vision_patch_size=16,
        context_length=77,
        vocab_size=49408,
        transformer_width=512,
        transformer_heads=8,
        transformer_layers=2,
    ),
}


# The architectures of OpenAI's ViT files, known without reading them (as clip_config_from_state_dict gives them).
_OPENAI_VIT_B = dict(
    embed_dim=512,
    image_resolution=224,
    vision_layers=12,
    vision_width=768,
    context_length=77,
    vocab_size=49408,
    transformer_width=512,
    transformer_heads=8,
    transformer_layers=12,
)
NAMED_ARCHITECTURES: dict[str, dict[str, int]] = {
    "ViT-B/32": {**_OPENAI_VIT_B, "vision_patch_size": 32},
    "ViT-B/16": {**_OPENAI_VIT_B, "vision_patch_size": 16},
    **TINY_MODELS,
}


def available_models() -> list[str]:
    """Names accepted by ``--pretrained_clip_name`` (besides a file path)."""
    return list(OPENAI_MODEL_URLS) + list(TINY_MODELS)
