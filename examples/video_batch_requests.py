"""Write a ``vllm run-batch`` input file: one chat request per video.

    python examples/video_batch_requests.py --model llava-video -o requests.jsonl clips/*.mp4
    vllm run-batch --plugins stgridpool -i requests.jsonl -o results.jsonl --model llava-video \\
        --allowed-local-media-path "$PWD/clips"

Videos go in as ``file://`` URLs (the run needs ``--allowed-local-media-path``
for their folder) or, with ``--data-urls``, inlined as base64 data URLs.
``--stgridpool '{"kernel_size": 3}'`` adds that per-line setting to every
line. A line that is not a valid request stops ``vllm run-batch`` as a whole
(vLLM 0.32 and 0.33 parse every line before answering any), so each line is
checked against vLLM's own ``BatchRequestInput`` before it is written; a
line that is valid but fails (an unreadable video, a setting the engine
refuses) gets an error line in the results while the rest completes.
"""

from __future__ import annotations

import argparse
import base64
import json
from pathlib import Path


def request_line(custom_id: str, model: str, video_url: str, question: str, max_tokens: int,
                 stgridpool: dict | None = None) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": video_url}},
            {"type": "text", "text": question},
        ]}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
    }
    if stgridpool is not None:
        body["mm_processor_kwargs"] = {"stgridpool": stgridpool}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def video_url(path: Path, inline: bool) -> str:
    if inline:
        return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()
    return path.resolve().as_uri()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="the model name run-batch serves (its --model)")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--question", default="Describe the video.")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--stgridpool", type=json.loads, default=None, help="per-line stgridpool object (JSON)")
    parser.add_argument("--data-urls", action="store_true", help="inline each video as a base64 data URL")
    parser.add_argument("videos", nargs="+", type=Path)
    args = parser.parse_args(argv)

    from vllm.entrypoints.launchers.run_batch import BatchRequestInput  # vLLM 0.32's location

    with open(args.output, "w") as out:
        for path in args.videos:
            line = json.dumps(request_line(path.name, args.model, video_url(path, args.data_urls), args.question,
                                           args.max_tokens, args.stgridpool))
            BatchRequestInput.model_validate_json(line)  # raises, naming the field, before run-batch would
            out.write(line + "\n")
    print(f"wrote {len(args.videos)} requests to {args.output}")


if __name__ == "__main__":
    main()
