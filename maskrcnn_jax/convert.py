"""Convert torchvision weights into a maskrcnn_jax checkpoint.

    python -m maskrcnn_jax.convert --from torchvision --input model.pth --output CKPT_DIR
    python -m maskrcnn_jax.convert --from torchvision --backbone_only \\
        --input resnet50.pth --output CKPT_DIR [--num_classes N]

The first converts a torchvision ResNet-FPN Mask R-CNN state dict (e.g.
``maskrcnn_resnet50_fpn``'s COCO weights); with ``--backbone_only`` the input
is a torchvision ResNet classification state dict (ImageNet initialisation)
and only backbone variables are written. The mapping is
``maskrcnn_jax.torchvision_weights``; this module only parses flags. Dashed
spellings (``--backbone-only``, ``--num-classes``) are accepted too.

Exit status: 0; 2 for bad flags or an input that cannot be read or converted
(one ``error:`` line on stderr).
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Sequence

from maskrcnn_jax import cli_flags
from maskrcnn_jax import torchvision_weights as tw
from maskrcnn_jax.checkpoint import CheckpointError, save_model

# The library's names, still importable from here (they lived here before).
from maskrcnn_jax.torchvision_weights import (  # noqa: F401
    config_from_state_dict,
    convert_torchvision_backbone,
    convert_torchvision_state_dict,
    infer_backbone,
    load_torch_state_dict,
    load_torchvision_backbone,
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = cli_flags.ArgumentParser(
        prog="python -m maskrcnn_jax.convert",
        description="Convert torchvision Mask R-CNN or ResNet weights into a checkpoint.",
    )
    parser.add_argument("--from", dest="source", choices=["torchvision"], default="torchvision")
    parser.add_argument("--input", required=True, help="torchvision .pth state dict")
    parser.add_argument("--output", required=True, help="checkpoint directory to write")
    parser.add_flag("--num_classes", type=int, help="check / set the number of classes")
    parser.add_flag(
        "--backbone_only",
        action="store_true",
        help="input is a ResNet classification state dict: write backbone variables only",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        state_dict = tw.load_torch_state_dict(args.input)
        if args.backbone_only:
            overrides = {} if args.num_classes is None else {"num_classes": args.num_classes}
            config = tw.backbone_config_from_state_dict(state_dict, **overrides)
            variables = tw.convert_torchvision_backbone(state_dict, config)
        else:
            config = tw.config_from_state_dict(state_dict)
            if args.num_classes is not None and args.num_classes != config.num_classes:
                raise ValueError(
                    f"--num_classes {args.num_classes} but the weights have "
                    f"{config.num_classes} classes"
                )
            variables = tw.convert_torchvision_state_dict(state_dict, config)
        step_dir = save_model(args.output, variables, config)
    except (ValueError, OSError, RuntimeError, pickle.UnpicklingError, CheckpointError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {step_dir} (depth {config.depth}, {config.num_classes} classes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
