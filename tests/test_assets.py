"""The shared test assets are what the rest of the suite assumes they are.

No vLLM engine here: these checks read files, configs and decoded frames only.
"""

from __future__ import annotations

import io
import json

import cv2
import decord
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from vllm_stgridpool_testing.sample_videos import DECORD_BAD_WIDTHS, mp4_bytes, synthetic_frame
from vllm_stgridpool_testing.tiny_models import (
    MARKER_NAME,
    build_llava_next_video,
    build_llava_onevision,
    read_build_marker,
)



def read_config(folder):
    return json.loads((folder / "config.json").read_text())


def weight_names(folder):
    with safe_open(folder / "model.safetensors", "pt") as weights:
        return set(weights.keys())


def decode_with_cv2(path):
    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return np.stack(frames)


# --- checkpoints -----------------------------------------------------------------


def test_onevision_config_gives_27x27_siglip_grid_and_qwen2_text(onevision_checkpoint):
    config = read_config(onevision_checkpoint)
    vision, text = config["vision_config"], config["text_config"]
    assert config["architectures"] == ["LlavaOnevisionForConditionalGeneration"]
    assert vision["model_type"] == "siglip_vision_model"
    assert vision["image_size"] // vision["patch_size"] == 27
    assert vision["image_size"] % vision["patch_size"] == 0
    assert text["model_type"] == "qwen2"
    assert text["hidden_size"] // text["num_attention_heads"] == 64
    assert config["vision_feature_select_strategy"] == "full"


def test_next_video_config_gives_24x24_clip_grid_pooled_to_12x12(next_video_checkpoint):
    config = read_config(next_video_checkpoint)
    vision, text = config["vision_config"], config["text_config"]
    assert config["architectures"] == ["LlavaNextVideoForConditionalGeneration"]
    assert vision["model_type"] == "clip_vision_model"
    assert vision["image_size"] // vision["patch_size"] == 24
    assert config["spatial_pool_stride"] == 2
    assert text["model_type"] == "llama"
    assert text["hidden_size"] // text["num_attention_heads"] == 64


@pytest.mark.parametrize("fixture_name", ["onevision_checkpoint", "next_video_checkpoint"])
def test_special_token_ids_match_the_tokenizer(fixture_name, request):
    folder = request.getfixturevalue(fixture_name)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = read_config(folder)
    assert tokenizer.convert_tokens_to_ids("<video>") == config["video_token_index"]
    assert tokenizer.convert_tokens_to_ids("<image>") == config["image_token_index"]
    assert tokenizer.eos_token == "<|im_end|>"
    assert len(tokenizer) == config["text_config"]["vocab_size"]
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Describe the video."}]}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt == "<|im_start|>user\n<video>\nDescribe the video.<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.unk_token_id not in tokenizer(prompt).input_ids


@pytest.mark.parametrize("fixture_name", ["onevision_checkpoint", "next_video_checkpoint"])
def test_weights_use_the_hub_layout_vllm_loads(fixture_name, request):
    """vLLM 0.32 maps ``vision_tower.`` onto a module whose tower sits under ``vision_model.``."""
    names = weight_names(request.getfixturevalue(fixture_name))
    vision = {name for name in names if name.startswith("vision_tower.")}
    assert vision and all(name.startswith("vision_tower.vision_model.") for name in vision)
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in names
    assert not any(".head." in name for name in vision)
    assert "language_model.lm_head.weight" in names
    assert "language_model.model.embed_tokens.weight" in names
    assert {"multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_2.weight"} <= names
    assert all(name.split(".")[0] in {"vision_tower", "language_model", "multi_modal_projector", "image_newline"}
               for name in names)


def test_onevision_has_the_newline_embedding_vllm_appends_per_video(onevision_checkpoint):
    assert "image_newline" in weight_names(onevision_checkpoint)


@pytest.mark.parametrize(
    ("fixture_name", "model_class_name"),
    [
        ("onevision_checkpoint", "LlavaOnevisionForConditionalGeneration"),
        ("next_video_checkpoint", "LlavaNextVideoForConditionalGeneration"),
    ],
)
def test_transformers_loads_every_weight(fixture_name, model_class_name, request):
    import transformers

    folder = request.getfixturevalue(fixture_name)
    model, info = getattr(transformers, model_class_name).from_pretrained(folder, output_loading_info=True)
    assert {kind: keys for kind, keys in info.items() if keys} == {}
    saved = load_file(folder / "model.safetensors")
    loaded = model.model.vision_tower.state_dict()["embeddings.patch_embedding.weight"]
    assert np.array_equal(saved["vision_tower.vision_model.embeddings.patch_embedding.weight"].numpy(), loaded.numpy())


@pytest.mark.parametrize(
    ("fixture_name", "video_tokens"),
    [("onevision_checkpoint", 16 * 14 * 14 + 1), ("next_video_checkpoint", 16 * 12 * 12)],
)
def test_processor_expands_a_16_frame_video_to_the_stock_token_count(fixture_name, video_tokens, request):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(request.getfixturevalue(fixture_name))
    clip = np.stack([synthetic_frame(i, 64, 48) for i in range(16)])
    inputs = processor(text="<video>", videos=[clip], return_tensors="np")
    assert inputs["input_ids"].shape[1] == video_tokens


def test_rebuilding_with_the_same_arguments_reuses_the_folder(onevision_checkpoint):
    weights = onevision_checkpoint / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_llava_onevision(onevision_checkpoint) == onevision_checkpoint
    assert weights.stat().st_mtime_ns == before
    assert read_build_marker(onevision_checkpoint)["args"]["seed"] == 0


def test_same_seed_gives_same_weights_and_other_arguments_rebuild(tmp_path, next_video_checkpoint):
    again = build_llava_next_video(tmp_path / "again")
    reference = load_file(next_video_checkpoint / "model.safetensors")
    rebuilt = load_file(again / "model.safetensors")
    assert reference.keys() == rebuilt.keys()
    assert all(np.array_equal(reference[name].numpy(), rebuilt[name].numpy()) for name in reference)

    build_llava_next_video(again, seed=1)
    reseeded = load_file(again / "model.safetensors")
    assert read_build_marker(again)["args"]["seed"] == 1
    name = "language_model.model.embed_tokens.weight"
    assert not np.array_equal(reference[name].numpy(), reseeded[name].numpy())


def test_wider_text_model_for_benchmarks(tmp_path):
    folder = build_llava_onevision(tmp_path / "wide", text_hidden=512, text_layers=6, text_heads=8, text_kv_heads=2)
    text = read_config(folder)["text_config"]
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (512, 6, 8)
    assert text["num_key_value_heads"] == 2


@pytest.mark.parametrize(("hidden", "heads"), [(64, 4), (96, 2), (128, 3)])
def test_head_sizes_cpu_attention_rejects_are_refused_before_building(tmp_path, hidden, heads):
    with pytest.raises(ValueError):
        build_llava_onevision(tmp_path / "bad", text_hidden=hidden, text_heads=heads, text_kv_heads=1)
    assert not (tmp_path / "bad").exists()


def test_refuses_to_overwrite_a_folder_it_did_not_build(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_llava_onevision(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"
    assert not (tmp_path / MARKER_NAME).exists()


# --- videos ---------------------------------------------------------------------

EVEN_SIZES = [(1, 160, 120), (2, 160, 120), (16, 160, 120), (100, 160, 120), (3, 4000, 16), (4, 2, 2)]
ODD_SIZES = [(1, 1, 1), (3, 7, 1000), (5, 33, 17)]


@pytest.mark.parametrize(("num_frames", "width", "height"), EVEN_SIZES + ODD_SIZES)
def test_mp4_decodes_to_requested_frames_and_size_with_cv2(mp4_factory, num_frames, width, height):
    frames = decode_with_cv2(mp4_factory(num_frames, width, height))
    assert frames.shape == (num_frames, height, width, 3)
    # Compare brightness only: 4:2:0 chroma blurs colour across 2x2 pixel blocks.
    luma = np.stack([cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) for frame in frames])
    expected = np.stack([cv2.cvtColor(synthetic_frame(i, width, height), cv2.COLOR_RGB2GRAY) for i in range(num_frames)])
    assert np.abs(luma.astype(int) - expected).mean() < 12


@pytest.mark.parametrize(("num_frames", "width", "height"), EVEN_SIZES + ODD_SIZES)
def test_mp4_decodes_to_requested_frames_with_decord(mp4_factory, num_frames, width, height):
    reader = decord.VideoReader(str(mp4_factory(num_frames, width, height)))
    assert len(reader) == num_frames
    if width not in DECORD_BAD_WIDTHS:
        assert reader.get_batch(list(range(num_frames))).asnumpy().shape == (num_frames, height, width, 3)


def test_decord_misreads_the_widths_the_docstring_lists(mp4_factory):
    """If a decord upgrade fixes this, DECORD_BAD_WIDTHS and the docstring should go."""
    assert decord.VideoReader(str(mp4_factory(2, 16, 16)))[0].shape != (16, 16, 3)


@pytest.mark.parametrize(("width", "height"), [(160, 120), (4000, 16)])
def test_consecutive_frames_differ(mp4_factory, width, height):
    frames = decode_with_cv2(mp4_factory(16, width, height)).astype(int)
    differences = np.abs(np.diff(frames, axis=0)).mean(axis=(1, 2, 3))
    assert differences.min() > 20


def test_all_frames_of_a_long_clip_are_distinct(mp4_factory):
    frames = decode_with_cv2(mp4_factory(100, 32, 24)).astype(int)
    flat = frames.reshape(len(frames), -1)
    distances = np.abs(flat[:, None, :] - flat[None, :, :]).mean(axis=2)
    np.fill_diagonal(distances, 255)
    assert distances.min() > 5


def test_mp4_bytes_is_an_mp4_file_decord_reads_from_memory():
    data = mp4_bytes(8, 64, 48)
    assert data[4:8] == b"ftyp"
    assert len(decord.VideoReader(io.BytesIO(data))) == 8


def test_factory_caches_each_clip(mp4_factory):
    first = mp4_factory(3, 64, 48, fps=5)
    assert mp4_factory(3, 64, 48, fps=5) == first
    assert mp4_factory(3, 64, 48, fps=6) != first
    assert cv2.VideoCapture(str(first)).get(cv2.CAP_PROP_FPS) == pytest.approx(5)
