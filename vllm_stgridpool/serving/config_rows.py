"""A config as one row of floats per video: how it travels from the processor to the model.

vLLM carries per-video values to the model as batched tensor fields; a row
of float64 holds the small integers and the float parameters of a config
exactly.
"""

from __future__ import annotations

from vllm_stgridpool.config import MAX_LEVELS, STGridPoolConfig

_ROW_LENGTH = 4 + 2 * MAX_LEVELS


def config_to_row(config: STGridPoolConfig) -> list[float]:
    levels = len(config.grid_sizes)
    pad = [0.0] * (MAX_LEVELS - levels)
    return [
        float(config.kernel_size),
        config.temperature,
        config.norm_p,
        float(levels),
        *map(float, config.grid_sizes),
        *pad,
        *map(float, config.grid_strides),
        *pad,
    ]


def config_from_row(row: list[float]) -> STGridPoolConfig:
    if len(row) != _ROW_LENGTH:
        raise ValueError(f"malformed stgridpool_config row of length {len(row)}")
    levels = int(row[3])
    return STGridPoolConfig(
        grid_sizes=tuple(int(v) for v in row[4 : 4 + levels]),
        grid_strides=tuple(int(v) for v in row[4 + MAX_LEVELS : 4 + MAX_LEVELS + levels]),
        kernel_size=int(row[0]),
        temperature=float(row[1]),
        norm_p=float(row[2]),
    )
