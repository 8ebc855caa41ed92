"""``make demo``: serve a video LLM with ST-GridPool and ask it about a real mp4.

By default everything is local: a tiny random-weight LLaVA-OneVision
checkpoint and an mp4 whose content changes over time are built once into
``./artifacts/demo/``, and ``llava-video`` becomes a model alias for that
checkpoint (vLLM's ``VLLM_MODEL_REDIRECT_PATH``). The demo then starts
``vllm serve llava-video --plugins stgridpool``, sends one chat request with
the video as a ``video_url`` through the ``openai`` client, and prints the
reply and the prompt tokens against what stock pooling would have cost.

``MODEL=llava-hf/llava-onevision-qwen2-7b-ov-hf make demo`` points it at a
real checkpoint (on a GPU machine); ``VIDEO=clip.mp4`` at a real video;
``VLLM_ARGS="..."`` adds server flags.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shlex
import sys
import time
from pathlib import Path

ALIAS = "llava-video"
# Under the directory it is run from (the repository root for `make demo`), never next to the code.
ARTIFACTS = Path(os.environ.get("STGRIDPOOL_ARTIFACTS", "artifacts")).resolve()
# Sized for a 2-core CPU machine: an explicit KV cache, float32 like the tests.
TINY_SERVER_ARGS = (
    "--max-model-len", "16384", "--kv-cache-memory-bytes", "1073741824",
    "--dtype", "float32", "--enforce-eager",
)


def prepare_local_assets(folder: Path) -> tuple[Path, Path, Path]:
    """Build (once) the tiny checkpoint, the demo mp4 and the ``llava-video`` alias file."""
    from vllm_stgridpool_testing.sample_videos import write_mp4
    from vllm_stgridpool_testing.tiny_models import build_llava_onevision

    checkpoint = build_llava_onevision(folder / "llava-onevision-tiny")
    video = folder / "demo_48_frames.mp4"
    if not video.exists():
        write_mp4(video, 48, width=320, height=240, fps=12.0)
    redirect = write_model_redirect(folder / "model_redirect.json", checkpoint)
    return checkpoint, video, redirect


def write_model_redirect(path: Path, checkpoint: Path) -> Path:
    """The file ``VLLM_MODEL_REDIRECT_PATH`` points at: ``llava-video`` -> local folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({ALIAS: str(checkpoint)}, indent=2) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL"), help="checkpoint or hub id (default: the tiny local one)")
    parser.add_argument("--video", default=os.environ.get("VIDEO"), help="mp4 to ask about (default: a generated one)")
    parser.add_argument("--question", default="What happens in this video?")
    args = parser.parse_args(argv)

    from openai import OpenAI

    from vllm_stgridpool_testing.launch import start_server
    from vllm_stgridpool.serving.metrics import read_counter

    folder = ARTIFACTS / "demo"
    _, default_video, redirect = prepare_local_assets(folder)
    model = args.model or ALIAS
    video = Path(args.video) if args.video else default_video
    server_args = [] if args.model else list(TINY_SERVER_ARGS)
    server_args += shlex.split(os.environ.get("VLLM_ARGS", ""))

    print(f"serving {model} with ST-GridPool: vllm serve {model} --plugins stgridpool {' '.join(server_args)}")
    started = time.monotonic()
    with start_server(
        model,
        "--plugins", "stgridpool", "--served-model-name", ALIAS, *server_args,
        env={"VLLM_MODEL_REDIRECT_PATH": str(redirect)},
        log_path=folder / "server.log",
        timeout=900,
    ) as server:
        print(f"server ready in {time.monotonic() - started:.0f}s (log: {server.log_path})")
        client = OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY")
        data_url = "data:video/mp4;base64," + base64.b64encode(video.read_bytes()).decode()
        response = client.chat.completions.create(
            model=ALIAS,
            messages=[{
                "role": "user",
                "content": [
                    {"type": "video_url", "video_url": {"url": data_url}},
                    {"type": "text", "text": args.question},
                ],
            }],
            max_tokens=24,
            temperature=0.0,
        )
        # The plugin's own accounting: what it emitted, and what stock pooling would have.
        counters = server.get("/metrics")
        video_tokens = int(read_counter(counters, "stgridpool_video_tokens_total"))
        saved = int(read_counter(counters, "stgridpool_video_tokens_saved_total"))

    prompt_tokens = response.usage.prompt_tokens
    stock_prompt_tokens = prompt_tokens + saved
    note = "" if args.model else "  (random weights: the words are noise)"
    print(f"\nvideo: {video.name}")
    print(f"reply: {response.choices[0].message.content!r}{note}")
    print(f"prompt tokens with ST-GridPool: {prompt_tokens:6d}  (video: {video_tokens})")
    print(f"prompt tokens with stock pooling: {stock_prompt_tokens:4d}  (video: {video_tokens + saved})")
    print(f"saved: {saved} tokens ({100 * saved / stock_prompt_tokens:.1f}% of the prompt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
