"""torchvision weights -> maskrcnn_jax variables.

Maps a ``maskrcnn_resnet50_fpn`` (or any torchvision ResNet-FPN Mask R-CNN)
state dict to our variables (:func:`convert_torchvision_state_dict`), or a
torchvision ResNet classification state dict to our backbone
(:func:`convert_torchvision_backbone`, ImageNet initialisation for training).
``python -m maskrcnn_jax.convert`` is the command line around it.

The mapping itself is pure numpy; torch is imported only to read a file
(:func:`load_torch_state_dict`). Layout changes: conv ``[O, I, kh, kw]`` ->
``[kh, kw, I, O]``, linear ``[O, I]`` -> ``[I, O]``, transposed conv
``[I, O, kh, kw]`` -> ``[kh, kw, I, O]``, fc6's input rows reordered from
torch's (c, h, w) flattening to our NHWC (h, w, c), batch norm folded to
``scale = w / sqrt(var + eps)``, ``bias = b - mean * scale`` in the
``"constants"`` collection.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np

from maskrcnn_jax.modeling.config import get_model_config
from maskrcnn_jax.modeling.mask_rcnn import init_model
from maskrcnn_jax.modeling.resnet import STAGES

BN_EPS = 1e-5  # torchvision's BatchNorm2d / FrozenBatchNorm2d
_IGNORED = re.compile(r"(num_batches_tracked$|^fc\.)")
_DEPTH_BY_BLOCKS = {(kind, blocks): depth for depth, (kind, blocks) in STAGES.items()}

# Old torchvision checkpoints (e.g. the released COCO weights) use these names;
# torchvision renames them on load, and so do we.
_OLD_NAMES = (
    (re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d+)\.(weight|bias)$"), r"\1.0.\2"),
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), r"rpn.head.conv.0.0.\1"),
    (
        re.compile(r"^roi_heads\.mask_head\.mask_fcn(\d)\.(weight|bias)$"),
        lambda m: f"roi_heads.mask_head.{int(m.group(1)) - 1}.0.{m.group(2)}",
    ),
)


def _normalize_keys(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        for pattern, repl in _OLD_NAMES:
            key = pattern.sub(repl, key)
        out[key] = np.asarray(value, dtype=np.float32)
    return out


def _conv(w: np.ndarray) -> np.ndarray:
    """torch conv [O, I, kh, kw] -> HWIO."""
    return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))


def _linear(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def _fold_bn(sd: dict[str, np.ndarray], prefix: str, used: set[str]) -> dict[str, np.ndarray]:
    names = [f"{prefix}.{n}" for n in ("weight", "bias", "running_mean", "running_var")]
    missing = [n for n in names if n not in sd]
    if missing:
        raise ValueError(f"state dict lacks batch-norm entries {missing}")
    used.update(names)
    w, b, mean, var = (sd[n].astype(np.float64) for n in names)
    scale = w / np.sqrt(var + BN_EPS)
    return {"scale": scale.astype(np.float32), "bias": (b - mean * scale).astype(np.float32)}


def _take(sd: dict[str, np.ndarray], key: str, used: set[str]) -> np.ndarray:
    if key not in sd:
        raise ValueError(f"state dict lacks {key!r}")
    used.add(key)
    return sd[key]


def infer_backbone(state_dict: Mapping[str, Any], prefix: str = "") -> dict[str, int]:
    """``depth`` and ``backbone_width`` of a torchvision ResNet state dict."""
    keys = list(state_dict)
    blocks = []
    for stage in range(1, 5):
        idx = {
            int(m.group(1))
            for k in keys
            if (m := re.match(rf"{re.escape(prefix)}layer{stage}\.(\d+)\.", k))
        }
        blocks.append(len(idx))
    kind = "bottleneck" if any(k.startswith(f"{prefix}layer1.0.conv3.") for k in keys) else "basic"
    depth = _DEPTH_BY_BLOCKS.get((kind, tuple(blocks)))
    if depth is None:
        raise ValueError(f"not a torchvision ResNet-18/34/50/101: {kind} blocks {blocks}")
    width = int(np.shape(state_dict[f"{prefix}conv1.weight"])[0])
    return {"depth": depth, "backbone_width": width}


def config_from_state_dict(
    state_dict: Mapping[str, Any], **overrides: Any
) -> ml_collections.ConfigDict:
    """Model config for a torchvision Mask R-CNN state dict.

    ``num_classes``, ``depth``, ``backbone_width``, ``fpn_channels``,
    ``representation_size`` and ``mask_head_dim`` come from the weights;
    everything else from torchvision's defaults and ``overrides``.
    """
    sd = _normalize_keys(state_dict)
    fields: dict[str, Any] = dict(infer_backbone(sd, "backbone.body."))
    outputs = (  # (field, the weight whose output size it is)
        ("num_classes", "roi_heads.box_predictor.cls_score.weight"),
        ("fpn_channels", "backbone.fpn.inner_blocks.0.0.weight"),
        ("representation_size", "roi_heads.box_head.fc6.weight"),
        ("mask_head_dim", "roi_heads.mask_head.0.0.weight"),
    )
    for field, key in outputs:
        if key in sd:
            fields[field] = int(sd[key].shape[0])
    fields.update(overrides)
    return get_model_config(**fields)


def backbone_config_from_state_dict(
    state_dict: Mapping[str, Any], **overrides: Any
) -> ml_collections.ConfigDict:
    """Model config for the backbone of a torchvision ResNet (or Mask R-CNN) state dict.

    ``depth`` and ``backbone_width`` come from the weights (a classification
    ResNet's, or a detection state dict's ``backbone.body.`` entries); the
    rest from the defaults and ``overrides`` (e.g. ``num_classes``).
    """
    sd = _normalize_keys(state_dict)
    prefix = "backbone.body." if "backbone.body.conv1.weight" in sd else ""
    return get_model_config(**infer_backbone(sd, prefix), **overrides)


def _backbone(sd, prefix, config, used):
    if config.norm != "frozen_bn":
        raise ValueError(
            f"torchvision ResNets use batch norm; convert into norm='frozen_bn', not {config.norm!r}"
        )
    kind, blocks = STAGES[config.depth]
    params: dict[str, Any] = {}
    consts: dict[str, Any] = {}

    def conv_bn(ours: str, conv_key: str, bn_key: str, p: dict, c: dict):
        p[ours] = {"kernel": _conv(_take(sd, f"{prefix}{conv_key}.weight", used))}
        c[ours] = _fold_bn(sd, f"{prefix}{bn_key}", used)

    conv_bn("conv1", "conv1", "bn1", params, consts)
    n_convs = 2 if kind == "basic" else 3
    for stage, n in enumerate(blocks):
        for i in range(n):
            name, tv = f"layer{stage + 1}_{i}", f"layer{stage + 1}.{i}"
            p, c = params.setdefault(name, {}), consts.setdefault(name, {})
            for j in range(1, n_convs + 1):
                conv_bn(f"conv{j}", f"{tv}.conv{j}", f"{tv}.bn{j}", p, c)
            if f"{prefix}{tv}.downsample.0.weight" in sd:
                conv_bn("downsample", f"{tv}.downsample.0", f"{tv}.downsample.1", p, c)
    return params, consts


def _conv_bias(sd, key, used, transform=_conv):
    return {
        "kernel": transform(_take(sd, f"{key}.weight", used)),
        "bias": _take(sd, f"{key}.bias", used),
    }


def _check_shapes(variables: dict, config: ml_collections.ConfigDict, subtree: str | None = None):
    expected = jax.eval_shape(lambda: init_model(config, jax.random.key(0)))
    got_tree, want_tree = variables, expected
    if subtree is not None:
        want_tree = {col: {subtree: v[subtree]} for col, v in expected.items() if subtree in v}
    got = {
        jax.tree_util.keystr(p): np.shape(x)
        for p, x in jax.tree_util.tree_leaves_with_path(got_tree)
    }
    want = {
        jax.tree_util.keystr(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_leaves_with_path(want_tree)
    }
    if got.keys() != want.keys():
        missing = sorted(want.keys() - got.keys())[:5]
        extra = sorted(got.keys() - want.keys())[:5]
        raise ValueError(
            f"converted variables do not fit the config: missing {missing}, extra {extra}"
        )
    bad = [(k, got[k], want[k]) for k in want if got[k] != want[k]]
    if bad:
        raise ValueError(
            f"converted shapes differ from the config's model (name, got, want): {bad[:5]}"
        )


def convert_torchvision_state_dict(
    state_dict: Mapping[str, Any], config: ml_collections.ConfigDict
) -> dict[str, Any]:
    """Maps a torchvision Mask R-CNN ResNet-FPN state dict to our variables.

    Args:
      state_dict: name -> array (numpy or anything ``np.asarray`` accepts),
        torchvision's current or legacy key names, optional ``module.`` prefix.
      config: model config (see :func:`config_from_state_dict` to infer it);
        must have ``norm="frozen_bn"`` and sizes matching the weights.

    Returns:
      ``{"params": ..., "constants": ...}`` of numpy float32 arrays.

    Raises:
      ValueError: naming missing, unused or mis-shaped entries.
    """
    sd = _normalize_keys(state_dict)
    used: set[str] = set()
    params, consts = {}, {}
    params["backbone"], consts["backbone"] = _backbone(sd, "backbone.body.", config, used)
    fpn = {}
    for i in range(4):
        fpn[f"inner_{i}"] = _conv_bias(sd, f"backbone.fpn.inner_blocks.{i}.0", used)
        fpn[f"layer_{i}"] = _conv_bias(sd, f"backbone.fpn.layer_blocks.{i}.0", used)
    params["fpn"] = fpn
    params["rpn_head"] = {
        "conv": _conv_bias(sd, "rpn.head.conv.0.0", used),
        "cls_logits": _conv_bias(sd, "rpn.head.cls_logits", used),
        "bbox_pred": _conv_bias(sd, "rpn.head.bbox_pred", used),
    }
    fc6 = _take(sd, "roi_heads.box_head.fc6.weight", used)  # [rep, C * s * s], (c, h, w) order
    s = config.box_roi_size
    c = fc6.shape[1] // (s * s)
    fc6 = fc6.reshape(fc6.shape[0], c, s, s).transpose(2, 3, 1, 0).reshape(s * s * c, -1)
    params["roi_box_head"] = {
        "fc6": {
            "kernel": np.ascontiguousarray(fc6),
            "bias": _take(sd, "roi_heads.box_head.fc6.bias", used),
        },
        "fc7": _conv_bias(sd, "roi_heads.box_head.fc7", used, _linear),
        "cls_score": _conv_bias(sd, "roi_heads.box_predictor.cls_score", used, _linear),
        "bbox_pred": _conv_bias(sd, "roi_heads.box_predictor.bbox_pred", used, _linear),
    }
    mask = {
        f"mask_fcn{i + 1}": _conv_bias(sd, f"roi_heads.mask_head.{i}.0", used) for i in range(4)
    }
    # ConvTranspose2d weight [I, O, kh, kw] -> [kh, kw, I, O].
    deconv = lambda w: np.ascontiguousarray(np.transpose(w, (2, 3, 0, 1)))
    mask["conv5_mask"] = _conv_bias(sd, "roi_heads.mask_predictor.conv5_mask", used, deconv)
    mask["mask_fcn_logits"] = _conv_bias(sd, "roi_heads.mask_predictor.mask_fcn_logits", used)
    params["roi_mask_head"] = mask
    unused = sorted(k for k in sd if k not in used and not _IGNORED.search(k))
    if unused:
        raise ValueError(f"state dict entries not converted (another architecture?): {unused[:8]}")
    variables = {"params": params, "constants": consts}
    _check_shapes(variables, config)
    return variables


def convert_torchvision_backbone(
    state_dict: Mapping[str, Any], config: ml_collections.ConfigDict
) -> dict[str, Any]:
    """Maps a torchvision ResNet (classification or detection) to our backbone.

    Args:
      state_dict: a ``torchvision.models.resnet*`` state dict (``fc`` is
        dropped) or a detection state dict (its ``backbone.body.`` entries).
      config: model config with the matching ``depth`` / ``backbone_width``
        and ``norm="frozen_bn"``.

    Returns:
      ``{"params": {"backbone": ...}, "constants": {"backbone": ...}}``, to be
      merged into fresh variables (e.g. from ``init_model``).
    """
    sd = _normalize_keys(state_dict)
    prefix = "backbone.body." if "backbone.body.conv1.weight" in sd else ""
    used: set[str] = set()
    params, consts = _backbone(sd, prefix, config, used)
    if not prefix:
        unused = sorted(k for k in sd if k not in used and not _IGNORED.search(k))
        if unused:
            raise ValueError(f"state dict entries not converted (not a ResNet?): {unused[:8]}")
    variables = {"params": {"backbone": params}, "constants": {"backbone": consts}}
    _check_shapes(variables, config, subtree="backbone")
    return variables


def load_torchvision_backbone(path: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Reads a torchvision ResNet ``.pth`` and converts it with
    :func:`convert_torchvision_backbone` (ImageNet initialisation for training)."""
    return convert_torchvision_backbone(load_torch_state_dict(path), config)


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a ``.pth`` state dict (or a checkpoint dict holding ``"model"``) as numpy."""
    import torch  # only here: torch is not a runtime dependency

    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")  # noqa: TRY004
    return {k: v.detach().cpu().float().numpy() for k, v in obj.items() if hasattr(v, "detach")}
