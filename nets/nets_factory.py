"""Network factory (the authors' ``nets/nets_factory.py``) with architecture strings.

``"WResNet-40-4"`` is WRN-40-4, ``"ResNet-56"`` the CIFAR ResNet-56. The authors hard-code
WRN-16-4 for the student and WRN-40-4 for the teacher inside WResNet.py; here they are the
defaults ``DEFAULT_ARCH`` and any size can be asked for.
"""
from __future__ import annotations

import re

from nets.resnet import ResNet
from nets.base import image_hw
from nets.wresnet import WResNet

networks_map = {"WResNet": WResNet, "ResNet": ResNet}

DEFAULT_ARCH = {"Student": "WResNet-16-4", "Teacher": "WResNet-40-4"}

KNOWN_FORMS = ("WResNet-<depth>-<width> with depth = 6n+4 (e.g. WResNet-16-4, WResNet-40-4)",
               "ResNet-<depth> with depth = 6n+2 (e.g. ResNet-20, ResNet-56)")

_PATTERNS = {"WResNet": re.compile(r"^WResNet-(\d+)-(\d+)$"), "ResNet": re.compile(r"^ResNet-(\d+)$")}


def _unknown(name, why=""):
    return ValueError(f"unknown network {name!r}{why}; known forms: " + "; ".join(KNOWN_FORMS))


def parse_arch(name) -> tuple[str, int, int]:
    """``"WResNet-40-4" -> ("WResNet", 40, 4)``, ``"ResNet-56" -> ("ResNet", 56, 1)``."""
    if not isinstance(name, str):
        raise _unknown(name)
    for family, pattern in _PATTERNS.items():
        m = pattern.match(name.strip())
        if m:
            depth = int(m.group(1))
            width = int(m.group(2)) if family == "WResNet" else 1
            if family == "WResNet" and (depth < 10 or (depth - 4) % 6 or width < 1):
                raise _unknown(name, f" (WResNet depth must be 6n+4 >= 10 and width >= 1, got {depth}, {width})")
            if family == "ResNet" and (depth < 8 or (depth - 2) % 6):
                raise _unknown(name, f" (ResNet depth must be 6n+2 >= 8, got {depth})")
            return family, depth, width
    raise _unknown(name)


def keep_rate_for(image_size, is_main) -> float:
    """Dropout keep rate: 0.7 for the trained (main-scope) network on 32-pixel-high inputs, else 1
    (WResNet.py: ``keep_rate = .7`` only in the 32x32 branch; the frozen teacher uses 1)."""
    return 0.7 if is_main and image_hw(image_size)[0] == 32 else 1.0


def get_network(arch, num_classes, scope, image_size, is_main):
    """Build the network ``arch`` under TF1 scope ``scope`` with all variables created for inputs of
    ``image_size`` (int, (H, W) or (H, W, C)). ``is_main``: the network being trained."""
    family, depth, width = parse_arch(arch)
    if family == "WResNet":
        net = WResNet(depth, width, num_classes, scope=scope, keep_rate=keep_rate_for(image_size, is_main))
    else:
        net = ResNet(depth, num_classes, scope=scope)
    return net.build_for(image_size)


def arch_from_params(arrays, scope) -> str:
    """The architecture string a ``{TF1 name: array}`` dict (e.g. a loaded ``train_params.mat``)
    was saved from, read from its names and shapes under ``scope``."""
    names = [k for k in arrays if k.split("/")[0] == scope]
    if not names:
        raise ValueError(f"no parameters under scope {scope!r} (found scopes "
                         f"{sorted({k.split('/')[0] for k in arrays})})")
    for family, group in (("WResNet", "WResblock"), ("ResNet", "Resblock")):
        blocks = {m.group(1) for k in names for m in [re.match(rf"{scope}/{group}0/BasicBlock(\d+)/", k)] if m}
        if blocks:
            n = len(blocks)
            if family == "ResNet":
                return f"ResNet-{6 * n + 2}"
            conv = arrays.get(f"{scope}/{group}0/BasicBlock0/conv0/weights")
            if conv is None or len(conv.shape) != 4:
                raise ValueError(f"{scope}/{group}0/BasicBlock0/conv0/weights missing or not a conv kernel")
            return f"WResNet-{6 * n + 4}-{int(conv.shape[-1]) // 16}"
    raise ValueError(f"parameters under scope {scope!r} match no known network; known forms: "
                     + "; ".join(KNOWN_FORMS))
