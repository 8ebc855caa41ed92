"""The published checkpoints, as replicas, served by a real ``vllm serve ... --plugins stgridpool``.

Each replica has its checkpoint's structure and files (tiny_models.py). Each
server gets one 64-frame mp4 (the paper's setting) through the OpenAI chat
API, and the answer is checked twice, independently of the plugin:

- its prompt tokens against the formula (``T * h * w + 1`` for
  LLaVA-OneVision, ``T * h * (w + 1)`` for LLaVA-Video's grid layout,
  ``T * h * w`` for LLaVA-NeXT-Video) plus the text tokens of the replica's
  own chat template and tokenizer;
- its greedy tokens and first-step logprobs against transformers' own model
  with its pooling swapped for the plain reference implementation
  (tests/support/reference_stgridpool.py) and, for LLaVA-Video, its newline placed
  by a plain rewrite of LLaVA-NeXT's ``add_token_per_grid``; and the same
  comparison shown to reject wrong stages with the same token count (no
  pyramid, frames shifted by one, plain averaging).

LLaVA-Video is served exactly as the README tells users to: ``vllm serve
llava-video --plugins stgridpool``, no redirect file, offline, with the
replica in the Hugging Face cache under the published repository id.
"""

from __future__ import annotations

import base64
import functools
import json
import math

import openai
import pytest
import torch

from tests.support.engines import run_engine, servers_started
from tests.support.hf_reference import WRONG_STAGES, assert_rejects_wrong_stages, distance, shifted
from tests.support.reference_layout import add_token_per_grid
from tests.support.reference_stgridpool import st_gridpool_reference
from vllm_stgridpool_testing.launch import start_server

pytestmark = pytest.mark.engine

FRAMES = 64
QUESTION = "What happens in this video?"
NEW_TOKENS = 4
# vLLM against transformers, both float32 on the CPU: measured 3.5e-7 to 9.7e-7 on the replicas. Each
# test that uses it shows it rejects the wrong stages of REPLICA_WRONG_STAGES (distances printed;
# measured: no pyramid 1.1e-2 to 4.8e-2, frames shifted 5.9e-3 to 9.5e-2, plain averaging 2.1e-5 on
# LLaVA-Video, 3.7e-5 on LLaVA-OneVision, 2.8e-3 on LLaVA-NeXT-Video).
LOGPROB_TOLERANCE = 1e-5
SERVER_ARGS = (
    "--plugins", "stgridpool",
    "--dtype", "float32",  # so vLLM and transformers agree token for token
    "--enforce-eager",
    "--kv-cache-memory-bytes", str(256 << 20),  # many times what one 64-frame prompt of these replicas needs
)
REPLICA_WRONG_STAGES = {**WRONG_STAGES, "plain averaging (temperature 0)": ({"temperature": 0.0}, False)}
NO_REDIRECT = {"VLLM_MODEL_REDIRECT_PATH": ""}  # the venv's demo alias file must not answer for these names


def chat(video_url: str) -> list[dict]:
    return [{
        "role": "user",
        "content": [{"type": "video_url", "video_url": {"url": video_url}}, {"type": "text", "text": QUESTION}],
    }]


def ask(server, model: str, video, **extra):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY", max_retries=0)
    url = "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()
    return client.chat.completions.create(
        model=model, messages=chat(url), max_tokens=NEW_TOKENS, temperature=0.0,
        logprobs=True, top_logprobs=5, extra_body={"return_tokens_as_token_ids": True, **extra},
    )


def served_answer(response) -> dict:
    """Greedy token ids and the first step's top logprobs (token id -> logprob) of a chat response."""
    steps = response.choices[0].logprobs.content
    token_id = lambda item: int(item.token.removeprefix("token_id:"))  # noqa: E731
    return {
        "prompt_tokens": response.usage.prompt_tokens,
        "tokens": [token_id(step) for step in steps],
        "first_logprobs": {token_id(item): item.logprob for item in steps[0].top_logprobs},
    }


def rendered_prompt(checkpoint) -> str:
    """The prompt text the replica's chat template makes of the chat (the video as one placeholder)."""
    from transformers import AutoTokenizer

    template = json.loads((checkpoint / "chat_template.json").read_text())["chat_template"]
    message = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    return tokenizer.apply_chat_template(message, chat_template=template, tokenize=False, add_generation_prompt=True)


def text_tokens(checkpoint) -> int:
    """Prompt tokens other than the ``<video>`` placeholder; chat prompts get no BOS added (vLLM's default)."""
    from transformers import AutoTokenizer

    prompt = rendered_prompt(checkpoint)
    assert prompt.count("<video>") == 1
    return len(AutoTokenizer.from_pretrained(checkpoint)(prompt, add_special_tokens=False)["input_ids"]) - 1


def decoded_frames(video):
    """All frames of the mp4, as the server decodes them (its video loader; 64 of 64 frames sampled)."""
    from vllm_stgridpool.video.loader import PyAVVideoLoader

    frames, metadata = PyAVVideoLoader.load_bytes(video.read_bytes(), num_frames=FRAMES)
    assert metadata["total_num_frames"] == FRAMES and len(frames) == FRAMES
    return frames


def reference_pool(features: torch.Tensor, side: int, kernel: int, pooling: dict) -> torch.Tensor:
    """(T, side * side, D) -> (T, h * w, D) with the plain reference ST-GridPool (paper defaults, ``kernel``,
    then ``pooling``)."""
    frames, _, dim = features.shape
    pooled = st_gridpool_reference(features.reshape(frames, side, side, dim).double(), kernel_size=kernel, **pooling)
    return pooled.reshape(frames, -1, dim).to(features.dtype)


def pooled_side(side: int, kernel: int | None) -> int:
    return math.ceil(side / 2) if kernel is None else (side - kernel) // kernel + 1


def transformers_answer(model, processor, prompt: str, frames) -> dict:
    inputs = processor(text=prompt, videos=[frames], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
    prompt_len = inputs["input_ids"].shape[1]
    first = torch.log_softmax(out.scores[0][0].double(), dim=-1)
    return {"prompt_tokens": prompt_len, "tokens": out.sequences[0, prompt_len:].tolist(), "first": first}


def onevision_in_transformers(checkpoint, prompt: str, frames, *, kernel: int | None, layout: str, pooling=None) -> dict:
    """transformers' LLaVA-OneVision, pooled by the reference (``kernel``; None: its own bilinear pooling),
    its newline placed per ``layout``, its processor's placeholder count set to match."""
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = LlavaOnevisionForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    out_side = pooled_side(side, kernel)

    def count(num_frames: int) -> int:
        return num_frames * out_side * (out_side + 1) if layout == "grid" else num_frames * out_side**2 + 1

    processor.replace_video_token = lambda inputs, video_idx, **_: processor.video_token * count(
        len(inputs["pixel_values_videos"][video_idx])
    )
    if kernel is not None:
        model.model.apply_pooling = lambda features: reference_pool(features, side, kernel, pooling or {})
    if layout == "grid":
        video_features = model.model.get_video_features

        @functools.wraps(video_features)  # generate() reads its signature
        def in_grid_layout(*args, **kwargs):
            out = video_features(*args, **kwargs)
            video = out.pooler_output[0, :-1]  # transformers' one newline per video, dropped
            pooled = video.reshape(-1, out_side, out_side, video.shape[-1])
            out.pooler_output = add_token_per_grid(pooled, model.model.image_newline.to(video.dtype))[None]
            return out

        model.model.get_video_features = in_grid_layout
    return transformers_answer(model, processor, prompt, frames)


def next_video_in_transformers(checkpoint, prompt: str, frames, *, kernel: int, pooling=None) -> dict:
    """transformers' LLaVA-NeXT-Video with its pooling (before the projector) swapped for the reference.

    Its processor is assembled from the checkpoint's files: transformers'
    AutoProcessor cannot load them (huggingface/transformers#42142; P9).
    """
    from transformers import (
        AutoTokenizer,
        LlavaNextImageProcessor,
        LlavaNextVideoForConditionalGeneration,
        LlavaNextVideoProcessor,
        LlavaNextVideoVideoProcessor,
    )

    settings = json.loads((checkpoint / "processor_config.json").read_text())
    settings.pop("processor_class")
    processor = LlavaNextVideoProcessor(
        video_processor=LlavaNextVideoVideoProcessor.from_pretrained(checkpoint),
        image_processor=LlavaNextImageProcessor.from_pretrained(checkpoint),
        tokenizer=AutoTokenizer.from_pretrained(checkpoint),
        **settings,
    )
    model = LlavaNextVideoForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    vision = model.config.vision_config
    side = vision.image_size // vision.patch_size
    out_side = pooled_side(side, kernel)
    processor.replace_video_token = lambda inputs, video_idx, **_: processor.video_token * (
        len(inputs["pixel_values_videos"][video_idx]) * out_side**2
    )

    class ReferencePooling(torch.nn.Module):
        def forward(self, features):  # (T, side * side, D) of the one video, CLS already dropped
            return reference_pool(features, side, kernel, pooling or {})

    model.model.vision_resampler = ReferencePooling()
    return transformers_answer(model, processor, prompt, frames)


def assert_same_answer(
    served: dict, reference: dict, in_transformers, frames, label: str, stages=REPLICA_WRONG_STAGES
) -> None:
    """``served`` equals ``reference`` (prompt length, greedy tokens, first-step logprobs within
    LOGPROB_TOLERANCE), and the tolerance rejects each wrong stage: ``in_transformers(frames,
    pooling=...)`` is the reference's own call, run on the shifted frames or with other pooling settings."""
    assert served["prompt_tokens"] == reference["prompt_tokens"]
    assert served["tokens"] == reference["tokens"]
    measured = distance(served["first_logprobs"], reference["first"])
    print(f"\n{label}: {measured:.2e} from transformers")
    assert measured < LOGPROB_TOLERANCE

    def wrong_first(settings: dict, frames_shifted: bool):
        wrong = in_transformers(shifted(frames) if frames_shifted else frames, pooling=settings)
        assert wrong["prompt_tokens"] == served["prompt_tokens"]  # same token count: only the logprobs tell
        return wrong["first"]

    assert_rejects_wrong_stages(served["first_logprobs"], wrong_first, LOGPROB_TOLERANCE, label, stages)


@pytest.fixture(scope="module")
def video(mp4_factory):
    return mp4_factory(FRAMES)


@pytest.fixture(scope="module")
def frames(video):
    return decoded_frames(video)


def hf_cache_with(checkpoint, repo_id: str, root):
    """A Hugging Face hub cache holding ``checkpoint`` as the snapshot of ``repo_id`` (nothing downloaded)."""
    revision = "0" * 40
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / revision).symlink_to(checkpoint, target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def launched(llava_video_replica, onevision_replica, next_video_replica, tmp_path_factory):
    """The module's three servers and its engine run, started two at a time: name -> finished future."""
    def serve(model, name: str, *args: str, env: dict[str, str]):
        folder = tmp_path_factory.mktemp(name.replace("-", "_") + "_server")
        return functools.partial(
            start_server, model, *SERVER_ARGS, *args, env={**NO_REDIRECT, **env},
            log_path=folder / "server.log", timeout=900,
        )

    # LLaVA-Video: no redirect file, offline, the replica in the hub cache as the published id.
    cache = hf_cache_with(llava_video_replica, "llava-hf/LLaVA-Video-7B-Qwen2-hf", tmp_path_factory.mktemp("hub"))
    launches = {
        "llava-video": serve(
            "llava-video", "llava-video", "--max-model-len", "16384",
            env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)},
        ),
        "llava-onevision": serve(
            onevision_replica, "llava-onevision", "--max-model-len", "16384",
            "--served-model-name", "llava-onevision", env={},
        ),
        "llava-next-video": serve(next_video_replica, "llava-next-video", "--served-model-name", "llava-next-video", env={}),
        "stock grid": functools.partial(stock_pooling_in_the_grid_layout, llava_video_replica),
    }
    with servers_started(*launches.values()) as futures:
        yield dict(zip(launches, futures))


class Served:
    """Tests of one of the module's servers: ``name`` is its launch and its served model name."""

    name: str

    @pytest.fixture(scope="class")
    def server(self, launched):
        return launched[self.name].result()

    @pytest.fixture(scope="class")
    def answer(self, server, video):
        return served_answer(ask(server, self.name, video))


class TestLlavaVideo(Served):
    """``vllm serve llava-video --plugins stgridpool``: the published LLaVA-Video, in its grid layout."""

    name = "llava-video"

    def test_the_alias_names_the_published_checkpoint_before_anything_loads(self, server, answer):
        log = server.log()
        resolved = log.index("model alias: llava-video -> llava-hf/LLaVA-Video-7B-Qwen2-hf")
        assert resolved < log.index("Resolved architecture: LlavaOnevisionForConditionalGeneration")
        assert "models--llava-hf--LLaVA-Video-7B-Qwen2-hf" in log

    def test_64_frames_cost_the_grid_layout(self, answer, llava_video_replica):
        assert answer["prompt_tokens"] == text_tokens(llava_video_replica) + FRAMES * 13 * (13 + 1)

    def test_same_answer_as_transformers_with_reference_pooling_in_the_grid(self, answer, llava_video_replica, frames):
        in_transformers = functools.partial(
            onevision_in_transformers, llava_video_replica, rendered_prompt(llava_video_replica), kernel=2, layout="grid"
        )
        assert_same_answer(answer, in_transformers(frames), in_transformers, frames, "LLaVA-Video replica")

    def test_a_request_cannot_switch_layouts(self, server, video, answer):
        with pytest.raises(openai.BadRequestError, match="video_newline"):
            ask(server, "llava-video", video, mm_processor_kwargs={"stgridpool": {"video_newline": "video"}})


def stock_pooling_in_the_grid_layout(llava_video_replica) -> dict:
    """``"enabled": false`` on LLaVA-Video in an engine: its answer to a 16-frame video."""
    return run_engine(
        llava_video_replica,
        [[{"frames": 16}]],
        plugins="stgridpool",
        hf_overrides={"stgridpool": {"enabled": False, "max_frames": 16}},  # profiles 16 frames, not 64
    )[0][0]


def test_stock_pooling_in_the_grid_layout_matches_transformers(launched, llava_video_replica):
    """``"enabled": false`` on LLaVA-Video: vLLM's bilinear pooling, LLaVA-Video's layout (the paper's baseline)."""
    from tests.support.engine_runner import PROMPT, video

    served = launched["stock grid"].result()
    frames = video(16, seed=0)
    in_transformers = functools.partial(onevision_in_transformers, llava_video_replica, PROMPT, kernel=None, layout="grid")
    reference = in_transformers(frames)
    assert served["prompt_len"] == reference["prompt_tokens"] == text_tokens(llava_video_replica) + 16 * 14 * 15
    answer = {
        "prompt_tokens": served["prompt_len"],
        "tokens": served["tokens"][:NEW_TOKENS],
        "first_logprobs": {int(token): logprob for token, logprob in served["first_logprobs"].items()},
    }
    # Stock pooling has no pyramid to leave out: its wrong stage is the shifted frame.
    only_shift = {name: stage for name, stage in WRONG_STAGES.items() if stage[1]}
    assert_same_answer(answer, reference, in_transformers, frames, "stock pooling, grid layout", only_shift)


class TestOneVision(Served):
    """The published LLaVA-OneVision-7B's structure: one newline per video, as vLLM and transformers serve it."""

    name = "llava-onevision"

    def test_64_frames_cost_one_newline_per_video(self, answer, onevision_replica):
        assert answer["prompt_tokens"] == text_tokens(onevision_replica) + FRAMES * 13 * 13 + 1

    def test_same_answer_as_transformers_with_reference_pooling(self, answer, onevision_replica, frames):
        in_transformers = functools.partial(
            onevision_in_transformers, onevision_replica, rendered_prompt(onevision_replica), kernel=2, layout="video"
        )
        assert_same_answer(answer, in_transformers(frames), in_transformers, frames, "LLaVA-OneVision replica")


class TestNextVideo(Served):
    """The published LLaVA-NeXT-Video-7B's structure: CLIP 24 x 24, pooled before the projector, no newline."""

    name = "llava-next-video"

    def test_64_frames_cost_the_formula(self, answer, next_video_replica):
        assert answer["prompt_tokens"] == text_tokens(next_video_replica) + FRAMES * 12 * 12

    def test_same_answer_as_transformers_with_reference_pooling(self, answer, next_video_replica, frames):
        in_transformers = functools.partial(
            next_video_in_transformers, next_video_replica, rendered_prompt(next_video_replica), kernel=2
        )
        assert_same_answer(answer, in_transformers(frames), in_transformers, frames, "LLaVA-NeXT-Video replica")
