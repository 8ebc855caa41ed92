"""Tiny random-weight video LLM checkpoints, built locally.

Nothing can be fetched from a model hub here, so tests, the demo and the
benchmarks build their models: a real architecture and processor, random
weights, a word-level tokenizer.  Each builder writes a folder that both
vLLM 0.32 and HF transformers 5 load with their own ``from_pretrained``.

Vision towers stay tiny (they run once per frame); the text model is
parameterised so a benchmark can ask for a wider, deeper one.  vLLM's CPU
attention only accepts some head sizes (32, 64, 80, ..., 256, 512) and its
Llama/Qwen2 layers derive the head size as ``hidden // heads``, so the text
width must be a supported multiple of the head count.

Weight layout: transformers 5 saves a CLIP or SigLIP tower as
``vision_tower.<module>``, but vLLM 0.32 loads the hub layout
``vision_tower.vision_model.<module>``.  transformers itself reads the hub
layout (its CLIPVisionModel/SiglipVisionModel conversion mapping strips
``vision_model.``), so the builders rewrite the saved keys to the hub layout.
The SigLIP attention-pooling head is never used by LLaVA models and is not
created at all (``vision_use_head=False``).

The structural replicas at the end of this module are different: each
copies a published checkpoint (LLaVA-OneVision-7B, LLaVA-Video-7B,
LLaVA-NeXT-Video-7B) in everything that reaches the plugin or the
processors, files and token ids included, and shrinks only depth and widths.

The two tiny models share one ChatML chat template.  Weights are saved in float32;
vLLM on CPU runs them in bfloat16 unless given ``dtype="float32"``, which is
what makes its greedy tokens equal transformers' (``tests/test_engine.py``
checks that through the plugin).
"""

from __future__ import annotations

import itertools
import json
import shutil
import tempfile
from pathlib import Path

import torch

MARKER_NAME = "tiny_model_build.json"
BUILD_FORMAT = 1
CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
SPECIAL_TOKENS = ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, VIDEO_TOKEN)

# Words prompts are likely to use, so they tokenize to themselves, not <unk>.
COMMON_WORDS = """
user assistant system a an the this that these those is are was were be it its
what which who where when why how do does did can could will would should
describe explain summarize tell me about in on at of to from with and or but
not no yes video image frame frames clip scene picture person people man woman
child dog cat car ball moves moving runs walks jumps red green blue yellow
white black left right up down first then after before happens happening
shown shows see seen color colour shape square circle line fast slow one two
three four five many some all each time start end
""".split()
PUNCTUATION = list(".,?!:;'\"()-")
VOCAB_SIZE = 1024

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<video>\n"
    "{% elif part['type'] == 'image' %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_llava_onevision(path, **sizes) -> Path:
    """Build (or reuse) a tiny LLaVA-OneVision: SigLIP 378 px / patch 14 (27x27), Qwen2 text.

    ``sizes`` are the keywords of :func:`model_sizes`.
    """
    return _build_once(Path(path), "llava_onevision", model_sizes(**sizes), _write_llava_onevision)


def build_llava_next_video(path, **sizes) -> Path:
    """Build (or reuse) a tiny LLaVA-NeXT-Video: CLIP 336 px / patch 14 (24x24), Llama text.

    Like the released checkpoints it reads the second-to-last vision layer
    (``vision_feature_layer=-2``) and average-pools frames with stride 2.
    ``sizes`` are the keywords of :func:`model_sizes`.
    """
    return _build_once(Path(path), "llava_next_video", model_sizes(**sizes), _write_llava_next_video)


def model_sizes(
    *,
    text_hidden: int = 128,
    text_layers: int = 2,
    text_heads: int = 2,
    text_kv_heads: int = 1,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    seed: int = 0,
) -> dict:
    """The sizes (and weight seed) a tiny checkpoint is built with; the defaults make the test models."""
    _check_head_size(text_hidden, text_heads, text_kv_heads)
    return dict(
        text_hidden=text_hidden, text_layers=text_layers, text_heads=text_heads,
        text_kv_heads=text_kv_heads, vision_hidden=vision_hidden,
        vision_layers=vision_layers, seed=seed,
    )


def read_build_marker(path) -> dict | None:
    """The arguments a folder was built with, or None if it holds no finished build."""
    marker = Path(path) / MARKER_NAME
    if not marker.is_file():
        return None
    return json.loads(marker.read_text())


def _build_once(path: Path, kind: str, args: dict, write) -> Path:
    """Build into a scratch folder and move it in place, so a half-built folder is never reused."""
    wanted = {"kind": kind, "format": BUILD_FORMAT, "args": args}
    if _holds_build(path, wanted):
        return path
    if path.exists():
        if any(path.iterdir()) and read_build_marker(path) is None:
            raise FileExistsError(f"{path} exists and was not made by a tiny-model builder")
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(scratch, **args)
        _rewrite_vision_keys_to_hub_layout(scratch / "model.safetensors")
        (scratch / MARKER_NAME).write_text(json.dumps(wanted, indent=2, sort_keys=True))
        try:
            scratch.rename(path)
        except OSError:
            # Another process finished the same build first; theirs is as good as ours.
            if not _holds_build(path, wanted):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return path


def _holds_build(path: Path, wanted: dict) -> bool:
    return read_build_marker(path) == wanted and (path / "model.safetensors").is_file()


def _check_head_size(hidden: int, heads: int, kv_heads: int) -> None:
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"text_hidden={hidden} / text_heads={heads} / text_kv_heads={kv_heads} do not divide")
    if hidden // heads not in CPU_ATTENTION_HEAD_SIZES:
        raise ValueError(
            f"head size {hidden // heads} is not one vLLM's CPU attention supports: {CPU_ATTENTION_HEAD_SIZES}"
        )


def _vision_sizes(hidden, layers, image_size, patch_size) -> dict:
    """A tiny vision tower: it runs once per frame, so it stays small in every build."""
    return dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, image_size=image_size, patch_size=patch_size,
    )


def _text_sizes(tokenizer, ids, hidden, layers, heads, kv_heads) -> dict:
    return dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden // heads, max_position_embeddings=32768, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=ids["eos"], pad_token_id=ids["pad"],
    )


def _write_llava_onevision(folder: Path, *, text_hidden, text_layers, text_heads, text_kv_heads,
                           vision_hidden, vision_layers, seed) -> None:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    image_size, patch_size = 378, 14
    tokenizer = _make_tokenizer()
    ids = _special_ids(tokenizer)
    pinpoints = [[image_size * h, image_size * w] for h in range(1, 7) for w in range(1, 7)]
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            **_vision_sizes(vision_hidden, vision_layers, image_size, patch_size), vision_use_head=False,
        ),
        text_config=Qwen2Config(
            **_text_sizes(tokenizer, ids, text_hidden, text_layers, text_heads, text_kv_heads)
        ),
        image_token_index=ids["image"],
        video_token_index=ids["video"],
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size={"height": image_size, "width": image_size}, image_grid_pinpoints=pinpoints,
        ),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        num_image_tokens=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )
    _save(folder, LlavaOnevisionForConditionalGeneration, config, processor, seed)


def _write_llava_next_video(folder: Path, *, text_hidden, text_layers, text_heads, text_kv_heads,
                            vision_hidden, vision_layers, seed) -> None:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextImageProcessor,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
    )

    image_size, patch_size = 336, 14
    tokenizer = _make_tokenizer()
    ids = _special_ids(tokenizer)
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    square = {"height": image_size, "width": image_size}
    config = LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(
            **_vision_sizes(vision_hidden, vision_layers, image_size, patch_size),
            projection_dim=vision_hidden,
        ),
        text_config=LlamaConfig(
            **_text_sizes(tokenizer, ids, text_hidden, text_layers, text_heads, text_kv_heads)
        ),
        image_token_index=ids["image"],
        video_token_index=ids["video"],
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        spatial_pool_mode="average",
        spatial_pool_stride=2,
        tie_word_embeddings=False,
    )
    processor = LlavaNextVideoProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": image_size}, crop_size=square, image_grid_pinpoints=pinpoints,
        ),
        video_processor=LlavaNextVideoVideoProcessor(size={"shortest_edge": image_size}, crop_size=square),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    _save(folder, LlavaNextVideoForConditionalGeneration, config, processor, seed)


def _save(folder: Path, model_class, config, processor, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).eval()
    model.save_pretrained(folder, max_shard_size="100GB")
    processor.save_pretrained(folder)


def _rewrite_vision_keys_to_hub_layout(weights_file: Path) -> None:
    """Rename ``vision_tower.X`` to ``vision_tower.vision_model.X``: the layout vLLM 0.32 loads."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(weights_file)
    renamed = {}
    for name, tensor in tensors.items():
        if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
            name = "vision_tower.vision_model." + name.removeprefix("vision_tower.")
        renamed[name] = tensor
    save_file(renamed, weights_file, metadata={"format": "pt"})


def _vocabulary() -> list[str]:
    """Special tokens, common words, punctuation, then made-up syllable words up to VOCAB_SIZE."""
    vocab = list(SPECIAL_TOKENS) + COMMON_WORDS + PUNCTUATION + [str(d) for d in range(10)]
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    for pair in itertools.product(syllables, repeat=2):
        if len(vocab) >= VOCAB_SIZE:
            break
        word = "".join(pair)
        if word not in vocab:
            vocab.append(word)
    return vocab


def _make_tokenizer():
    """A lower-casing word-level tokenizer; unknown words map to <unk>."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = _vocabulary()
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocab)}, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # words joined by spaces, tidy punctuation
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", IMAGE_TOKEN, VIDEO_TOKEN],
        model_max_length=32768,
        chat_template=CHAT_TEMPLATE,
    )


def _special_ids(tokenizer) -> dict[str, int]:
    ids = {
        "image": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        "video": tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        "eos": tokenizer.eos_token_id,
        "pad": tokenizer.pad_token_id,
    }
    assert tokenizer.unk_token_id not in ids.values()
    return ids


# --- Structural replicas of the published checkpoints ---------------------------
#
# The tiny models above have a structure this project chose. A replica copies
# everything of a published checkpoint that reaches the plugin or the
# processors (vision tower type, image and patch size, feature layer and
# strategy, grid pinpoints, token ids and vocabulary size, rope scaling, the
# processor files exactly as the hub repository lays them out, chat template)
# and shrinks only depth and widths. The facts come from the checkpoints'
# config files and transformers' conversion scripts.

ONEVISION_7B = "llava-hf/llava-onevision-qwen2-7b-ov-hf"
LLAVA_VIDEO_7B = "llava-hf/LLaVA-Video-7B-Qwen2-hf"
NEXT_VIDEO_7B = "llava-hf/LLaVA-NeXT-Video-7B-hf"

# Qwen2's special tokens follow its 151,643 byte-level tokens; the LLaVA
# conversions add <image> and <video> after them.
QWEN2_BASE_VOCAB = 151643
QWEN2_ADDED_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, VIDEO_TOKEN)  # 151643..151647
QWEN2_7B_VOCAB = 152128  # the text model's (padded) embedding rows

# Vicuna (Llama) has 32,000 sentencepiece tokens, <unk> <s> </s> first; the
# conversion adds <video> (32000) then <image> (32001); embeddings padded to 32,064.
VICUNA_BASE_VOCAB = 32000
VICUNA_SPECIALS = ("<unk>", "<s>", "</s>")
VICUNA_ADDED_TOKENS = (VIDEO_TOKEN, IMAGE_TOKEN)
VICUNA_VOCAB = 32064

# Images first, then videos, then the text of each message, as the LLaVA-OneVision
# and LLaVA-NeXT-Video conversions render them.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'video' %}<video>\n{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'] | upper }}: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}"
    "{% for part in message['content'] if part['type'] == 'image' %}<image>\n{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'video' %}<video>\n{% endfor %}"
    "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }} {% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_onevision_replica(path, *, seed: int = 0) -> Path:
    """A replica of ``llava-hf/llava-onevision-qwen2-7b-ov-hf``: SigLIP 384/14 (27x27), Qwen2 ids and vocabulary."""
    return _build_once(Path(path), "replica:" + ONEVISION_7B, {"seed": seed}, _write_onevision_replica)


def build_llava_video_replica(path, *, seed: int = 1) -> Path:
    """A replica of ``llava-hf/LLaVA-Video-7B-Qwen2-hf``: the OneVision-7B conversion's files, other weights.

    LLaVA-Video was trained with the grid newline layout; the checkpoint's
    files do not say so, its name does (see README, "Supported checkpoints").
    """
    return _build_once(Path(path), "replica:" + LLAVA_VIDEO_7B, {"seed": seed}, _write_onevision_replica)


def build_next_video_replica(path, *, seed: int = 0) -> Path:
    """A replica of ``llava-hf/LLaVA-NeXT-Video-7B-hf``: CLIP 336/14 (24x24 after CLS), Vicuna ids, linear rope 2.5."""
    return _build_once(Path(path), "replica:" + NEXT_VIDEO_7B, {"seed": seed}, _write_next_video_replica)


def _replica_text(hidden: int = 128, layers: int = 2, heads: int = 2, kv_heads: int = 1) -> dict:
    """Shrunk text widths; head_dim 64 (vLLM's CPU attention rejects the 16 a narrower split would give)."""
    _check_head_size(hidden, heads, kv_heads)
    return dict(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
    )


def _write_onevision_replica(folder: Path, *, seed: int) -> None:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    image_size, patch_size = 384, 14
    sides = (384, 768, 1152, 1536, 1920, 2304)
    pinpoints = [[h, w] for h in sides for w in sides]
    tokenizer = _replica_tokenizer(
        base_vocab=QWEN2_BASE_VOCAB, specials=("<unk>",), added=QWEN2_ADDED_TOKENS,
        unk="<unk>", bos=None, eos="<|im_end|>", pad="<|endoftext|>",
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_ADDED_TOKENS}
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(
            **_vision_sizes(32, 2, image_size, patch_size),
            hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=False,
        ),
        text_config=Qwen2Config(
            **_replica_text(), vocab_size=QWEN2_7B_VOCAB, max_position_embeddings=32768,
            rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        ),
        image_token_index=ids[IMAGE_TOKEN],
        video_token_index=ids[VIDEO_TOKEN],
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=pinpoints,
        use_image_newline_parameter=True,
        tie_word_embeddings=False,
    )
    assert (config.image_token_index, config.video_token_index) == (151646, 151647)
    _save_weights(folder, LlavaOnevisionForConditionalGeneration, config, seed)
    _write_generation_config(folder, bos=ids["<|endoftext|>"], eos=ids["<|im_end|>"])
    pixels = dict(
        size={"height": image_size, "width": image_size}, resample=3,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True,
    )
    image_processor = LlavaOnevisionImageProcessor(**pixels, image_grid_pinpoints=pinpoints, do_pad=True)
    _write_json(folder / "preprocessor_config.json", {
        **image_processor.to_dict(), "processor_class": "LlavaOnevisionProcessor",
    })
    # Published in a subfolder, which transformers does not read: it builds the
    # video processor from preprocessor_config.json instead. No num_frames key.
    video = LlavaOnevisionVideoProcessor(**pixels).to_dict()
    video.pop("num_frames", None)
    _write_json(folder / "video_processor" / "video_preprocessor_config.json", video)
    _write_json(folder / "processor_config.json", {
        "image_token": IMAGE_TOKEN,
        "num_image_tokens": (image_size // patch_size) ** 2,
        "processor_class": "LlavaOnevisionProcessor",
        "video_token": VIDEO_TOKEN,
        "vision_feature_select_strategy": "full",
    })
    _write_json(folder / "chat_template.json", {"chat_template": QWEN_CHAT_TEMPLATE})
    tokenizer.save_pretrained(folder)


def _write_next_video_replica(folder: Path, *, seed: int) -> None:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextImageProcessor,
        LlavaNextVideoConfig,
        LlavaNextVideoForConditionalGeneration,
    )

    image_size, patch_size, vision_hidden = 336, 14, 32
    pinpoints = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    tokenizer = _replica_tokenizer(
        base_vocab=VICUNA_BASE_VOCAB, specials=VICUNA_SPECIALS, added=VICUNA_ADDED_TOKENS,
        unk="<unk>", bos="<s>", eos="</s>", pad="<unk>",
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (*VICUNA_SPECIALS, *VICUNA_ADDED_TOKENS)}
    config = LlavaNextVideoConfig(
        vision_config=CLIPVisionConfig(
            **_vision_sizes(vision_hidden, 2, image_size, patch_size),
            projection_dim=vision_hidden, hidden_act="quick_gelu", layer_norm_eps=1e-5,
        ),
        text_config=LlamaConfig(
            **_replica_text(), vocab_size=VICUNA_VOCAB, max_position_embeddings=4096,
            rms_norm_eps=1e-5, rope_scaling={"factor": 2.5, "type": "linear"}, tie_word_embeddings=False,
            bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<unk>"],
        ),
        video_token_index=ids[VIDEO_TOKEN],
        image_token_index=ids[IMAGE_TOKEN],
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_grid_pinpoints=pinpoints,
        spatial_pool_mode="average",
        spatial_pool_stride=2,
        spatial_pool_out_channels=vision_hidden,
        use_image_newline_parameter=True,
        tie_word_embeddings=False,
    )
    assert (config.video_token_index, config.image_token_index) == (32000, 32001)
    _save_weights(folder, LlavaNextVideoForConditionalGeneration, config, seed)
    _write_generation_config(folder, bos=ids["<s>"], eos=ids["</s>"], pad=ids["<unk>"])
    # One preprocessor file for images and videos (no video processor file is published).
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_pad=True, do_resize=True, resample=3, image_grid_pinpoints=pinpoints,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    _write_json(folder / "preprocessor_config.json", {
        **image_processor.to_dict(), "processor_class": "LlavaNextVideoProcessor",
    })
    _write_json(folder / "processor_config.json", {
        "image_token": IMAGE_TOKEN,
        "video_token": VIDEO_TOKEN,
        "num_additional_image_tokens": 1,
        "patch_size": patch_size,
        "processor_class": "LlavaNextVideoProcessor",
        "vision_feature_select_strategy": "default",
    })
    _write_json(folder / "chat_template.json", {"chat_template": VICUNA_CHAT_TEMPLATE})
    tokenizer.save_pretrained(folder)


def _save_weights(folder: Path, model_class, config, seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config).eval()
    model.save_pretrained(folder, max_shard_size="100GB")
    _write_rope_as_published(folder / "config.json")


def _write_rope_as_published(config_file: Path) -> None:
    """The published files predate transformers 5: ``rope_theta`` / ``rope_scaling``, not ``rope_parameters``."""
    config = json.loads(config_file.read_text())
    text = config["text_config"]
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope["rope_theta"]
    if rope["rope_type"] != "default":
        text["rope_scaling"] = {"factor": rope["factor"], "type": rope["rope_type"]}
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_generation_config(folder: Path, **ids) -> None:
    names = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "pad_token_id"}
    _write_json(folder / "generation_config.json", {names[key]: value for key, value in ids.items()})


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=int) + "\n")


def _replica_tokenizer(*, base_vocab, specials, added, unk, bos, eos, pad):
    """A word-level tokenizer whose special tokens sit at the published ids.

    ``specials`` open the base vocabulary, made-up words fill it to
    ``base_vocab`` entries, and ``added`` tokens follow in order, as in the
    published tokenizers. Like Llama's, a tokenizer with ``bos`` prepends it
    when asked for special tokens (chat templates here do not add it).
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = _filled_vocabulary(list(specials), base_vocab)
    backend = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocab)}, unk_token=unk))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    backend.add_special_tokens(list(added))
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab.index(bos))],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token=unk, bos_token=bos, eos_token=eos, pad_token=pad,
        model_max_length=32768,
    )


def _filled_vocabulary(opening: list[str], size: int) -> list[str]:
    """``opening``, the common words and punctuation, then made-up syllable words up to ``size``."""
    vocab = opening + [word for word in [*COMMON_WORDS, *PUNCTUATION, *map(str, range(10))] if word not in opening]
    seen = set(vocab)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    for length in itertools.count(2):
        for pair in itertools.product(syllables, repeat=length):
            if len(vocab) >= size:
                return vocab
            word = "".join(pair)
            if word not in seen:
                seen.add(word)
                vocab.append(word)
