"""Model modules on tiny configs: shapes, jit, dtypes, variants, freezing, the
proposal / detection steps and converter against torchvision, and the training
forward (``MaskRCNN.losses``) against the explicit path it replaced."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torchvision

from maskrcnn_jax import losses, targets
from maskrcnn_jax.modeling import MaskRCNN, anchors_for, get_model_config, init_model, propose
from maskrcnn_jax.modeling.box_head import BoxHead, detect
from maskrcnn_jax.modeling.config import mask_head_prefix_sizes, mask_slots_per_image
from maskrcnn_jax.modeling.mask_head import ConvTranspose2x2, MaskHead
from maskrcnn_jax.ops import FPN_STRIDES, poolers
from maskrcnn_jax.ops.roi_align import roi_align_levels

IMAGE_SHAPE = (64, 96)


def random_images(batch: int = 2, shape=IMAGE_SHAPE, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0, 255, (batch, *shape, 3)).astype(np.float32)
    sizes = np.array([shape, (shape[0] - 14, shape[1] - 27)][:batch], np.int32)
    return jnp.asarray(images), jnp.asarray(sizes)


@pytest.fixture(scope="module")
def tiny_out(tiny_model):
    """Jitted inference with intermediates on two images, and the jitted function."""
    config, variables = tiny_model
    fn = jax.jit(lambda v, x, s: MaskRCNN(config).apply(v, x, s, intermediates=True))
    images, sizes = random_images()
    return fn, jax.device_get(fn(variables, images, sizes))


def test_config_defaults_and_json():
    c = get_model_config()
    assert (c.num_classes, c.depth, c.norm, c.freeze_at, c.fpn_channels) == (
        91,
        50,
        "frozen_bn",
        2,
        256,
    )
    assert (c.min_size, c.max_size, c.detections_per_img) == (800, 1333, 100)
    again = ml_collections.ConfigDict(json.loads(c.to_json()))
    assert again.to_dict() == c.to_dict()
    with pytest.raises(KeyError):
        get_model_config(num_clases=3)
    with pytest.raises(ValueError, match="norm"):
        get_model_config(norm="bn")


def test_inference_shapes_and_single_compilation(tiny_model, tiny_out):
    config, variables = tiny_model
    fn, out = tiny_out
    d = config.detections_per_img
    assert out["boxes"].shape == (2, d, 4) and out["scores"].shape == (2, d)
    assert out["labels"].dtype == np.int32 and out["valid"].dtype == np.bool_
    assert out["masks"].shape == (2, d, 28, 28)
    v, labels, boxes = out["valid"], out["labels"], out["boxes"]
    assert v.any()
    assert (labels[v] >= 1).all() and (labels[v] < config.num_classes).all()
    assert (boxes[1][v[1]][:, 2] <= 70 + 1e-4).all() and (boxes[1][v[1]][:, 3] <= 50 + 1e-4).all()
    masks, scores = out["masks"], out["scores"]
    assert (masks >= 0).all() and (masks <= 1).all() and (masks[~v] == 0).all()
    assert (np.diff(scores[0][v[0]]) <= 0).all()
    assert [f.shape[1:3] for f in out["features"]] == [(16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
    assert out["proposals"].shape == (2, config.rpn_post_nms_top_n_test, 4)
    # New values, same shapes: no recompilation.
    images, sizes = random_images(seed=1)
    fn(variables, images, sizes - 3)
    assert fn._cache_size() == 1


def test_stage_methods(tiny_model):
    config, variables = tiny_model
    rois = jnp.tile(
        jnp.asarray([[[0.0, 0.0, 30.0, 20.0], [5.0, 5.0, 60.0, 50.0], [0, 0, 0, 0]]]), (2, 1, 1)
    )
    labels = jnp.asarray([[1, 2, 3], [3, 1, 2]])

    def stages(module, images, sizes):
        feats = module.features(images, sizes)
        objectness, deltas = module.rpn(feats)
        logits, box_deltas = module.box_head(feats, rois)
        return {
            "feats": feats,
            "objectness": objectness,
            "deltas": deltas,
            "logits": logits,
            "box_deltas": box_deltas,
            "masks": module.mask_head(feats, rois),
            "chosen": module.roi_mask_head(feats, rois, labels),
        }

    def partial_masks(module, images, sizes):
        # Two valid detections per image: the short prefix branch runs.
        feats = module.features(images, sizes)
        valid = jnp.asarray([[True, True, False], [True, False, False]])
        return module.detection_masks(feats, rois, labels, valid)

    partial = jax.jit(lambda v, x, s: MaskRCNN(config).apply(v, x, s, method=partial_masks))(
        variables, *random_images()
    )
    out = jax.jit(lambda v, x, s: MaskRCNN(config).apply(v, x, s, method=stages))(
        variables, *random_images()
    )
    assert all(f.shape[-1] == config.fpn_channels for f in out["feats"])
    anchors, _ = anchors_for(config, IMAGE_SHAPE)
    assert out["objectness"].shape == (2, anchors.shape[0])
    assert out["deltas"].shape == (2, anchors.shape[0], 4)
    assert out["logits"].shape == (2, 3, 4) and out["box_deltas"].shape == (2, 3, 4, 4)
    assert out["masks"].shape == (2, 3, 28, 28, 4)
    # The inference path computes only the labelled channel: same values.
    np.testing.assert_allclose(
        out["chosen"],
        jnp.take_along_axis(out["masks"], labels[:, :, None, None, None], -1)[..., 0],
        atol=1e-5,
    )
    full = jax.nn.sigmoid(out["chosen"])
    np.testing.assert_allclose(partial[0, :2], full[0, :2], atol=1e-6)
    np.testing.assert_allclose(partial[1, :1], full[1, :1], atol=1e-6)
    assert float(jnp.abs(partial[0, 2:]).sum() + jnp.abs(partial[1, 1:]).sum()) == 0


def test_heads_pool_the_levels_of_the_strides_they_are_given(tiny_model, monkeypatch):
    config, variables = tiny_model
    model = MaskRCNN(config).bind(variables)
    assert model.roi_box_head.strides == model.roi_mask_head.strides == FPN_STRIDES
    scales = []

    def spy(features, boxes, levels, level_shapes, spatial_scales, *args):
        scales.append(list(spatial_scales))
        return roi_align_levels(features, boxes, levels, level_shapes, spatial_scales, *args)

    monkeypatch.setitem(poolers.ROI_ALIGN_IMPLS, "spy", spy)
    strides = (8, 16, 32, 64, 128)  # P3..P7 of a 128-pixel image; heads read the first four
    feats = [jnp.zeros((1, 128 // s, 128 // s, 4)) for s in strides]
    rois = jnp.asarray([[[0.0, 0.0, 40.0, 30.0]]])
    key = jax.random.key(0)
    BoxHead(3, 8, roi_align_impl="spy", strides=strides).init(key, feats, rois)
    MaskHead(3, 4, roi_align_impl="spy", strides=strides).init(key, feats, rois)
    assert scales == [[1 / 8, 1 / 16, 1 / 32, 1 / 64]] * 2


def test_bfloat16_compute(tiny_model, tiny_out, tiny_model_config):
    _, variables = tiny_model
    _, ref = tiny_out
    config16 = tiny_model_config(dtype="bfloat16")
    out = jax.jit(lambda v, x, s: MaskRCNN(config16).apply(v, x, s, intermediates=True))(
        variables, *random_images()
    )
    assert all(f.dtype == jnp.bfloat16 for f in out["features"])
    assert out["boxes"].dtype == jnp.float32 and bool(jnp.isfinite(out["masks"]).all())
    assert jax.tree.leaves(variables)[0].dtype == jnp.float32
    # bf16 features follow the float32 ones loosely.
    f16, f32 = np.asarray(out["features"][0], np.float32), ref["features"][0]
    assert np.abs(f16 - f32).max() / np.abs(f32).max() < 0.1


def _backbone_grads(config, variables):
    model = MaskRCNN(config)
    images, sizes = random_images(1)

    def loss(params):
        feats = model.apply(
            {**variables, "params": params}, images, sizes, method=MaskRCNN.features
        )
        return sum(jnp.sum(f.astype(jnp.float32) ** 2) for f in feats)

    value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
    assert np.isfinite(float(value))
    return {
        k: float(sum(jnp.abs(g).sum() for g in jax.tree.leaves(v)))
        for k, v in grads["backbone"].items()
    }


def test_group_norm_variant_and_frozen_stages(tiny_model_config):
    config = tiny_model_config(norm="gn", head_norm="gn")
    variables = init_model(config, jax.random.key(1))
    assert "constants" not in variables
    assert "gn" in variables["params"]["backbone"]["conv1"]
    assert "gn" in variables["params"]["fpn"]["inner_0"]
    assert "gn" in variables["params"]["roi_mask_head"]["mask_fcn1"]
    grads = _backbone_grads(config, variables)  # freeze_at=2: stem and layer1
    frozen = [k for k in grads if k == "conv1" or k.startswith("layer1_")]
    assert frozen and all(grads[k] == 0 for k in frozen)
    assert all(grads[k] > 0 for k in grads if k not in frozen)
    grads = _backbone_grads(tiny_model_config(norm="gn", head_norm="gn", freeze_at=0), variables)
    assert all(g > 0 for g in grads.values())


def test_resnet18_backbone_matches_torchvision():
    """Basic blocks + converter: C2..C5 equal torchvision's resnet18."""
    from torchvision.models._utils import IntermediateLayerGetter

    from maskrcnn_jax.torchvision_weights import convert_torchvision_backbone

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.0)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    net.eval()
    config = get_model_config(depth=18, num_classes=2)
    backbone = convert_torchvision_backbone(
        {k: v.numpy() for k, v in net.state_dict().items()}, config
    )
    x = np.random.default_rng(0).normal(size=(1, 64, 96, 3)).astype(np.float32)
    getter = IntermediateLayerGetter(net, {f"layer{i}": str(i) for i in range(1, 5)})
    with torch.no_grad():
        ref = [
            t.permute(0, 2, 3, 1).numpy()
            for t in getter(torch.from_numpy(x).permute(0, 3, 1, 2)).values()
        ]
    model = MaskRCNN(config)
    ours = model.apply(
        {"params": backbone["params"], "constants": backbone["constants"]},
        jnp.asarray(x),
        method=lambda m, x: m.backbone(x),
    )
    for r, o in zip(ref, ours):
        assert r.shape == o.shape
        np.testing.assert_allclose(o, r, atol=1e-4 * np.abs(r).max())


def _tv_rpn(pre: int, post: int):
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead

    anchors = AnchorGenerator(((32,), (64,), (128,), (256,), (512,)), ((0.5, 1.0, 2.0),) * 5)
    rpn = RegionProposalNetwork(
        anchors,
        RPNHead(8, 3),
        0.7,
        0.3,
        256,
        0.5,
        {"training": pre, "testing": pre},
        {"training": post, "testing": post},
        0.7,
    )
    return rpn.eval()


def test_propose_matches_torchvision(tiny_model_config):
    config = tiny_model_config()
    anchors, level_sizes = anchors_for(config, IMAGE_SHAPE)
    rng = np.random.default_rng(0)
    b, a = 2, anchors.shape[0]
    objectness = rng.normal(0, 2, (b, a)).astype(np.float32)
    deltas = rng.normal(0, 0.5, (b, a, 4)).astype(np.float32)
    deltas[:, ::7, 2] = -8.0  # some boxes collapse below min_size after clipping
    sizes = np.array([IMAGE_SHAPE, (40, 70)], np.int32)
    pre, post = 50, 60
    boxes, scores, valid = propose(
        jnp.asarray(objectness),
        jnp.asarray(deltas),
        anchors,
        jnp.asarray(sizes),
        level_sizes,
        pre,
        post,
        0.7,
        1e-3,
    )
    rpn = _tv_rpn(pre, post)
    tv_anchors = torch.from_numpy(np.array(anchors))
    decoded = rpn.box_coder.decode(torch.from_numpy(deltas.reshape(-1, 4)), [tv_anchors] * b).view(
        b, -1, 4
    )
    ref_boxes, ref_scores = rpn.filter_proposals(
        decoded, torch.from_numpy(objectness), [tuple(s) for s in sizes.tolist()], level_sizes
    )
    for i in range(b):
        n = len(ref_scores[i])
        assert int(valid[i].sum()) == n and bool(valid[i, :n].all())
        np.testing.assert_allclose(boxes[i, :n], ref_boxes[i].numpy(), atol=1e-4)
        np.testing.assert_allclose(scores[i, :n], ref_scores[i].numpy(), atol=1e-6)
        assert float(jnp.abs(boxes[i, n:]).sum()) == 0


def test_conv_transpose_2x2_and_its_gradients_match_torch():
    """``ConvTranspose2x2`` (the mask head's upsampling) against ``nn.ConvTranspose2d(k=2,
    s=2)``: the value and the gradients of x, kernel and bias for a fixed cotangent.
    An output sums Cin = 8 products, the x gradient Cout * 4 = 20, the kernel gradient
    N * h * w = 90, the bias gradient N * 2h * 2w = 360; each of absolute size at most
    a * b. Two float32 sums of n such terms, in any order, differ by at most
    2 * (n - 1) * 2^-24 * n * a * b."""
    rng = np.random.default_rng(0)
    n, h, w, cin, cout = 3, 5, 6, 8, 5
    x = rng.standard_normal((n, h, w, cin)).astype(np.float32)
    cot = rng.standard_normal((n, 2 * h, 2 * w, cout)).astype(np.float32)
    tconv = torch.nn.ConvTranspose2d(cin, cout, 2, stride=2)
    torch.nn.init.normal_(tconv.bias)
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    ty = tconv(tx)
    ty.backward(torch.from_numpy(cot).permute(0, 3, 1, 2))
    params = {
        "kernel": jnp.asarray(tconv.weight.detach().numpy().transpose(2, 3, 0, 1)),
        "bias": jnp.asarray(tconv.bias.detach().numpy()),
    }
    module = ConvTranspose2x2(cout)
    y, vjp = jax.vjp(lambda p, x: module.apply({"params": p}, x), params, jnp.asarray(x))
    dparams, dx = vjp(jnp.asarray(cot))
    m = lambda a: float(np.abs(a).max())
    bound = lambda terms, ab: 2 * (terms - 1) * 2**-24 * terms * ab
    mw = m(tconv.weight.detach().numpy())
    checks = [
        ("value", y, ty.detach().permute(0, 2, 3, 1), bound(cin + 1, max(m(x) * mw, m(params["bias"])))),
        ("x grad", dx, tx.grad.permute(0, 2, 3, 1), bound(4 * cout, m(cot) * mw)),
        ("kernel grad", dparams["kernel"], tconv.weight.grad.permute(2, 3, 0, 1), bound(n * h * w, m(x) * m(cot))),
        ("bias grad", dparams["bias"], tconv.bias.grad, bound(4 * n * h * w, m(cot))),
    ]
    for name, got, want, atol in checks:
        np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=atol, rtol=0, err_msg=name)


def test_detect_matches_torchvision():
    from torchvision.models.detection.roi_heads import RoIHeads

    rng = np.random.default_rng(1)
    b, r, k, d = 2, 40, 5, 10
    logits = rng.normal(0, 2, (b, r, k)).astype(np.float32)
    deltas = rng.normal(0, 1, (b, r, k, 4)).astype(np.float32)
    xy = rng.uniform(0, 60, (b, r, 2))
    proposals = np.concatenate([xy, xy + rng.uniform(2, 40, (b, r, 2))], -1).astype(np.float32)
    valid = np.ones((b, r), bool)
    valid[1, 30:] = False  # padded proposals
    sizes = np.array([IMAGE_SHAPE, (50, 70)], np.int32)
    boxes, scores, labels, keep = detect(
        jnp.asarray(logits),
        jnp.asarray(deltas),
        jnp.asarray(proposals),
        jnp.asarray(valid),
        jnp.asarray(sizes),
        0.05,
        0.5,
        1e-2,
        d,
        1000,
    )
    heads = RoIHeads(None, None, None, 0.5, 0.5, 512, 0.25, None, 0.05, 0.5, d)
    n = valid.sum(1)
    ref = heads.postprocess_detections(
        torch.from_numpy(np.concatenate([logits[i, : n[i]] for i in range(b)])),
        torch.from_numpy(np.concatenate([deltas[i, : n[i]].reshape(n[i], -1) for i in range(b)])),
        [torch.from_numpy(proposals[i, : n[i]]) for i in range(b)],
        [tuple(s) for s in sizes.tolist()],
    )
    for i in range(b):
        m = len(ref[1][i])
        assert int(keep[i].sum()) == m
        np.testing.assert_allclose(boxes[i, :m], ref[0][i].numpy(), atol=1e-4)
        np.testing.assert_allclose(scores[i, :m], ref[1][i].numpy(), atol=1e-6)
        np.testing.assert_array_equal(labels[i, :m], ref[2][i].numpy())


def test_pallas_roi_align_gives_the_same_detections(tiny_model, tiny_out):
    """Whole-model inference with the Pallas kernel (interpret mode on CPU)."""
    config, variables = tiny_model
    _, ref = tiny_out
    pallas_config = ml_collections.ConfigDict(config.to_dict())
    pallas_config.roi_align_impl = "pallas"
    images, sizes = random_images()
    out = jax.device_get(
        jax.jit(lambda v, x, s: MaskRCNN(pallas_config).apply(v, x, s))(variables, images, sizes)
    )
    np.testing.assert_array_equal(out["valid"], ref["valid"])
    assert out["valid"].sum() > 0
    np.testing.assert_array_equal(out["labels"], ref["labels"])
    np.testing.assert_allclose(out["boxes"], ref["boxes"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out["scores"], ref["scores"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["masks"], ref["masks"], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- training forward

LOSS_TERMS = ("rpn_objectness_loss", "rpn_box_loss", "classifier_loss", "box_loss", "mask_loss")


def _explicit_losses(model, variables, batch, key, score_thresh):
    """The five terms as the trainer computed them before ``MaskRCNN.losses``
    (``train.compute_losses``): the stages applied one by one and ``propose``
    called by hand, here with ``score_thresh`` explicit (the trainer passed
    none, i.e. 0)."""
    mc = model.config
    images = batch["image"].astype(jnp.float32)
    b, h, w = images.shape[:3]
    image_sizes = batch["image_size"]
    gt_boxes = batch["boxes"].astype(jnp.float32)
    gt_valid, gt_crowd, gt_labels = batch["valid"], batch["is_crowd"], batch["labels"]

    feats = model.apply(variables, images, image_sizes, method=MaskRCNN.features)
    objectness, deltas = model.apply(variables, feats, method=MaskRCNN.rpn)
    anchors, level_sizes = anchors_for(mc, (h, w))
    k_rpn, k_roi = jax.random.split(key)
    rpn_t = jax.vmap(
        lambda g, v, c, k: targets.rpn_targets(
            anchors, g, v, c, k, mc.rpn_batch_size_per_image, mc.rpn_positive_fraction
        )
    )(gt_boxes, gt_valid, gt_crowd, jax.random.split(k_rpn, b))
    rpn_obj, rpn_box = losses.rpn_loss(
        objectness, deltas, rpn_t.positive, rpn_t.negative, rpn_t.deltas, mc.smooth_l1_beta
    )
    proposals, _, proposal_valid = propose(
        jax.lax.stop_gradient(objectness),
        jax.lax.stop_gradient(deltas),
        anchors,
        image_sizes,
        level_sizes,
        mc.rpn_pre_nms_top_n_train,
        mc.rpn_post_nms_top_n_train,
        mc.rpn_nms_thresh,
        mc.rpn_min_size,
        score_thresh,
    )
    roi_t = jax.vmap(
        lambda p, pv, g, lab, v, c, k: targets.roi_targets(
            p, pv, g, lab, v, c, k, mc.roi_batch_size_per_image, mc.roi_positive_fraction
        )
    )(
        proposals,
        proposal_valid,
        gt_boxes,
        gt_labels,
        gt_valid,
        gt_crowd,
        jax.random.split(k_roi, b),
    )
    class_logits, box_deltas = model.apply(variables, feats, roi_t.rois, method=MaskRCNN.box_head)
    cls, box = losses.box_head_loss(
        class_logits, box_deltas, roi_t.labels, roi_t.deltas, roi_t.valid, mc.smooth_l1_beta
    )
    p = int(mc.roi_batch_size_per_image * mc.roi_positive_fraction)
    p = min(p, int(mc.mask_rois_per_image or p))
    mask_rois = roi_t.rois[:, :p]
    mask_logits = model.apply(variables, feats, mask_rois, method=MaskRCNN.mask_head)
    m = mask_logits.shape[2]
    mask_t = jax.vmap(lambda gm, gb, r, i: targets.mask_targets(gm, gb, r, i, m))(
        batch["masks"], gt_boxes, mask_rois, roi_t.matched[:, :p]
    )
    mask = losses.mask_loss(mask_logits, roi_t.labels[:, :p], mask_t, roi_t.positive[:, :p])
    return dict(zip(LOSS_TERMS, (rpn_obj, rpn_box, cls, box, mask)))


def _reduction_rtol(config, batch) -> dict[str, float]:
    """Per-term relative tolerance between two compilations of the same float32 terms.

    Each term is a float32 sum of N terms (then one division); XLA may order
    the sum differently in two graphs, which moves it by at most about
    N * 2^-24 relative: N = B * A anchors for the RPN terms, B * S sampled
    RoIs for the box-head terms, B * P * 28 * 28 mask pixels for the mask term.
    """
    mc = config.model
    b, h, w = batch["image"].shape[:3]
    a = int(anchors_for(mc, (h, w))[0].shape[0])
    p = int(mc.roi_batch_size_per_image * mc.roi_positive_fraction)
    p = min(p, int(mc.mask_rois_per_image or p))
    n = {
        "rpn_objectness_loss": b * a,
        "rpn_box_loss": b * a * 4,
        "classifier_loss": b * mc.roi_batch_size_per_image,
        "box_loss": b * mc.roi_batch_size_per_image * 4,
        "mask_loss": b * p * 28 * 28,
    }
    return {k: v * 2.0**-24 for k, v in n.items()}


# Above every proposal's sigmoid score at initialisation (logits ~ 0): with
# it, training sees no proposal at all, only the ground-truth boxes as RoIs.
HIGH_SCORE_THRESH = 1.0


@pytest.fixture(scope="module")
def training_terms(tiny_train_batch, tiny_train_state):
    """The terms of ``MaskRCNN.losses`` and of the explicit path, at
    ``rpn_score_thresh`` 0 (the default) and ``HIGH_SCORE_THRESH``.

    One jit: where the two paths are the same computation XLA may share it,
    which is what this comparison establishes.
    """
    config, batch = tiny_train_batch
    state, _ = tiny_train_state
    thresholded = ml_collections.ConfigDict(config.model.to_dict())
    thresholded.rpn_score_thresh = HIGH_SCORE_THRESH
    model, model_thresholded = MaskRCNN(config.model), MaskRCNN(thresholded)

    def run(variables, batch, key):
        def own(m):
            return m.apply(variables, batch["image"], batch["image_size"], batch, key,
                           method=MaskRCNN.losses)  # fmt: skip

        return {
            "own": own(model),
            "explicit": _explicit_losses(model, variables, batch, key, 0.0),
            "own_thresholded": own(model_thresholded),
            "explicit_thresholded": _explicit_losses(
                model, variables, batch, key, HIGH_SCORE_THRESH
            ),
        }

    terms = jax.jit(run)(state.variables(), batch, jax.random.key(3))
    return _reduction_rtol(config, batch), jax.device_get(terms)


def test_losses_equal_the_explicit_training_path(training_terms):
    rtol, terms = training_terms
    assert set(terms["own"]) == set(LOSS_TERMS)
    for k in LOSS_TERMS:
        assert np.isfinite(terms["own"][k]) and terms["own"][k] > 0, k
        np.testing.assert_allclose(terms["own"][k], terms["explicit"][k], rtol=rtol[k], err_msg=k)


def test_losses_respect_rpn_score_thresh(training_terms):
    """Training proposals obey ``rpn_score_thresh`` as inference ones do."""
    rtol, terms = training_terms
    own, explicit = terms["own_thresholded"], terms["explicit_thresholded"]
    for k in LOSS_TERMS:
        np.testing.assert_allclose(own[k], explicit[k], rtol=rtol[k], err_msg=k)
    # The RPN terms do not depend on the proposals. The RoI terms do, beyond
    # the tolerance above (no proposal is left): a model that ignored the
    # threshold would fail that comparison.
    for k in ("rpn_objectness_loss", "rpn_box_loss"):
        np.testing.assert_allclose(own[k], terms["own"][k], rtol=rtol[k], err_msg=k)
    for k in ("classifier_loss", "box_loss", "mask_loss"):
        unthresholded = terms["explicit"][k]
        assert abs(explicit[k] - unthresholded) > rtol[k] * abs(unthresholded), (
            k,
            explicit[k],
            unthresholded,
        )


def test_mask_head_prefix_sizes():
    assert mask_head_prefix_sizes(128, 4) == [16, 32, 64, 128]
    assert mask_head_prefix_sizes(100, 4) == [13, 25, 50, 100]
    assert mask_head_prefix_sizes(32, 1) == [32]
    assert mask_head_prefix_sizes(3, 4) == [1, 2, 3]  # distinct


def test_mask_head_on_the_shortest_prefix_gives_the_loss_and_gradients_of_all_slots(
    tiny_train_batch, tiny_train_state
):
    """``mask_head_prefixes`` 4 (the default) against 1 (every slot, no switch), in one jit: the
    mask term and its gradient w.r.t. every parameter. The slots left out hold no
    positive, so their loss weights are 0 and only the summation order differs.
    Each gradient element sums at most N = B * p * 28 * 28 float32 terms (mask pixels;
    the backbone's sums over its positions are no longer), so the two differ by at
    most N * 2^-24 of that sum's magnitude; the check is norm-wise, against each
    parameter's largest gradient. The fixture's batch must take a shorter prefix
    than p, or the test would compare a computation with itself."""
    config, batch = tiny_train_batch
    state, _ = tiny_train_state
    mc = ml_collections.ConfigDict(config.model.to_dict())
    mc.mask_head_prefixes = 4
    all_slots = ml_collections.ConfigDict(mc.to_dict())
    all_slots.mask_head_prefixes = 1
    key = jax.random.key(3)

    def mask_term(model):
        def f(params):
            variables = {**state.variables(), "params": params}
            return model.apply(variables, batch["image"], batch["image_size"], batch, key,
                               method=MaskRCNN.losses)["mask_loss"]  # fmt: skip

        return jax.value_and_grad(f)(state.params)

    def run():
        _, inter = MaskRCNN(mc).apply(
            state.variables(), batch["image"], batch["image_size"], batch, key,
            method=MaskRCNN.losses, mutable=["intermediates"],
        )  # fmt: skip
        positives = jnp.max(jnp.sum(inter["intermediates"]["mask_positive"][0], axis=1))
        return mask_term(MaskRCNN(mc)), mask_term(MaskRCNN(all_slots)), positives

    (short, g_short), (full, g_full), positives = jax.device_get(jax.jit(run)())
    p = mask_slots_per_image(mc)
    sizes = mask_head_prefix_sizes(p, mc.mask_head_prefixes)
    assert 0 < positives <= sizes[-2] < p, (positives, sizes)
    n = batch["image"].shape[0] * p * 28 * 28
    np.testing.assert_allclose(short, full, rtol=n * 2.0**-24)
    assert short > 0
    flat_short = jax.tree_util.tree_leaves_with_path(g_short)
    for (path, a), b in zip(flat_short, jax.tree.leaves(g_full)):
        scale = float(np.abs(b).max())
        np.testing.assert_allclose(a, b, rtol=0, atol=n * 2.0**-24 * scale,
                                   err_msg=jax.tree_util.keystr(path))  # fmt: skip
    assert any(np.abs(b).max() > 0 for b in jax.tree.leaves(g_full))


def test_training_settings_are_validated():
    for field, bad in [
        ("rpn_batch_size_per_image", 0),
        ("roi_positive_fraction", 1.5),
        ("rpn_positive_fraction", 0.0),
        ("mask_rois_per_image", -1),
        ("mask_head_prefixes", 0),
        ("smooth_l1_beta", -0.1),
    ]:
        with pytest.raises(ValueError, match=f"model config {field}="):
            get_model_config(**{field: bad})
    c = get_model_config()
    assert (c.rpn_batch_size_per_image, c.rpn_positive_fraction) == (256, 0.5)
    assert (c.roi_batch_size_per_image, c.roi_positive_fraction) == (512, 0.25)
    assert (c.mask_rois_per_image, c.smooth_l1_beta) == (0, 1.0 / 9)


# ------------------------------------------ the paper's ablations: poolers and mask losses

# Model config overrides of the ablation settings (experiments/ablations.py's variants
# other than "align", the tiny model itself) trained here. Each step pairs a pooler with a
# mask-loss setting: the two are separate parts of the model (the RoI pooling of both
# heads, the mask loss on the mask logits), and the tests below check each part's own
# effect, so two compiled steps cover the four settings (each step about 60 s to build
# while the suite's other worker runs).
VARIANTS = {
    "align_v2+softmax": {"roi_pooler": "align_v2", "mask_loss": "softmax"},
    "pool+class_agnostic": {"roi_pooler": "pool", "class_agnostic_mask": True},
}
# The losses.* function each mask setting must train with, on the model's own mask inputs.
EXPECTED_MASK_LOSS = {
    "sigmoid": lambda x, lab, t, pos: losses.mask_loss(x, lab, t, pos),
    "softmax": lambda x, lab, t, pos: losses.softmax_mask_loss(x, lab, t, pos),
    "class_agnostic": lambda x, lab, t, pos: losses.class_agnostic_mask_loss(x, t, pos),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant_step(request, tiny_train_batch):
    """One jitted train step of each variant on the tiny batch, plus the mask loss's inputs.

    Not "align" with the sigmoid mask loss: that is the tiny model itself, whose train
    step the tests of test_train.py and test_export.py run, and whose sigmoid mask loss
    test_losses_equal_the_explicit_training_path checks.
    """
    from maskrcnn_jax import optim, train

    config, batch = tiny_train_batch
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in VARIANTS[request.param].items():
        config.model[key] = value
    # The mask head on all its slots, no switch over prefixes (that has its own test): each
    # variant's step then lowers and compiles in about 25 s instead of 33 s.
    config.model.mask_head_prefixes = 1
    k_init, k_train = jax.random.split(jax.random.key(0))
    variables = train.initial_variables(config, k_init, (64, 64))
    optimizer = optim.make_optimizer(config, variables["params"])
    state = train.create_train_state(variables, optimizer, k_train)
    model = MaskRCNN(config.model)
    step = train.make_train_step(model, config, optimizer)

    def run(state, batch):
        key = jax.random.fold_in(state.rng, state.step)  # the step's own key
        terms, inter = model.apply(
            state.variables(), batch["image"], batch["image_size"], batch, key,
            method=MaskRCNN.losses, mutable=["intermediates"],
        )  # fmt: skip
        new_state, metrics = step(state, batch)
        return terms, inter["intermediates"], new_state.params, metrics

    out = jax.device_get(jax.jit(run)(state, batch))
    return request.param, config.model, state.params, out, _reduction_rtol(config, batch)


def test_each_variant_trains_one_step_with_finite_losses(variant_step):
    name, _, params, (terms, _, new_params, metrics), rtol = variant_step
    assert bool(metrics["finite"]), name
    for k in LOSS_TERMS:
        assert np.isfinite(metrics[k]) and metrics[k] > 0, (name, k)
        # The step's terms are the same function of the same inputs as the plain apply's.
        np.testing.assert_allclose(metrics[k], terms[k], rtol=rtol[k], err_msg=f"{name} {k}")
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.any(a != b), params, new_params))
    assert any(moved), name


def test_each_variant_trains_with_its_mask_loss(variant_step):
    """The model's mask term is the losses.* function of its setting on the same logits."""
    name, model_config, _, (terms, inter, _, _), _ = variant_step
    logits, labels, t, pos = (
        np.asarray(inter[k][0])
        for k in ("mask_logits", "mask_labels", "mask_targets", "mask_positive")
    )
    channels = 1 if model_config.class_agnostic_mask else model_config.num_classes
    assert logits.shape[-1] == channels and logits.shape[2:4] == t.shape[2:] == (28, 28)
    assert pos.any(), "the tiny batch must have positive mask RoIs"
    rtol = logits[..., 0].size * 2.0**-24  # float32 means over this many terms
    mode = "class_agnostic" if model_config.class_agnostic_mask else model_config.mask_loss
    expected = float(EXPECTED_MASK_LOSS[mode](logits, labels, t, pos))
    np.testing.assert_allclose(terms["mask_loss"], expected, rtol=rtol, err_msg=name)
    if mode != "class_agnostic":  # the other per-class loss gives another value
        other = "softmax" if mode == "sigmoid" else "sigmoid"
        assert abs(float(EXPECTED_MASK_LOSS[other](logits, labels, t, pos)) - expected) > 1e-3


@pytest.mark.parametrize("setting", ["sigmoid", "softmax", "class_agnostic"])
def test_inference_mask_channel_of_each_mask_setting(setting, tiny_model_config):
    overrides = {"class_agnostic_mask": True} if setting == "class_agnostic" else {}
    if setting == "softmax":
        overrides["mask_loss"] = "softmax"
    config = tiny_model_config(**overrides)
    variables = init_model(config, jax.random.key(1))
    model = MaskRCNN(config)
    images, sizes = random_images(batch=2)
    d = config.detections_per_img
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 30, size=(2, d, 2))
    boxes = jnp.asarray(np.concatenate([xy, xy + rng.uniform(4, 30, size=(2, d, 2))], -1))
    labels = jnp.asarray(rng.integers(1, config.num_classes, size=(2, d)), jnp.int32)
    valid = jnp.asarray(np.arange(d)[None] < np.array([[3], [5]]))  # a prefix per image

    def run(v):
        feats = model.apply(v, images, sizes, method=MaskRCNN.features)
        probs = model.apply(v, feats, boxes, labels, valid, method=MaskRCNN.detection_masks)
        return probs, model.apply(v, feats, boxes, method=MaskRCNN.mask_head)

    probs, logits = jax.device_get(jax.jit(run)(variables))  # [2, D, 28, 28], [.., K or 1]
    if setting == "sigmoid":
        picked = np.take_along_axis(logits, np.asarray(labels)[..., None, None, None], -1)
        expected = jax.nn.sigmoid(picked[..., 0])
    elif setting == "softmax":
        soft = jax.nn.softmax(logits, axis=-1)
        expected = np.take_along_axis(soft, np.asarray(labels)[..., None, None, None], -1)[..., 0]
    else:
        assert logits.shape[-1] == 1
        expected = jax.nn.sigmoid(logits[..., 0])
    expected = np.where(np.asarray(valid)[..., None, None], expected, 0.0)
    # The label-only 1x1 conv sums Cin=16 products in another order: ~16 float32 roundings.
    np.testing.assert_allclose(probs, expected, rtol=0, atol=16 * 2.0**-24)
    assert np.all(probs[~np.asarray(valid)] == 0) and probs[np.asarray(valid)].std() > 0


@pytest.mark.parametrize("pooler", ["align", "align_v2", "pool"])
def test_heads_pool_with_the_configured_pooler(pooler, tiny_model_config, monkeypatch):
    """Both heads reach the pooler of ``roi_pooler``; align_v2 is RoIAlign with aligned=True."""
    calls = []
    align, pool = poolers.multilevel_roi_align, poolers.multilevel_roi_pool

    def spy_align(*args, **kwargs):
        calls.append(("align", args[5]))  # aligned
        return align(*args, **kwargs)

    def spy_pool(*args, **kwargs):
        calls.append(("pool", None))
        return pool(*args, **kwargs)

    monkeypatch.setattr(poolers, "multilevel_roi_align", spy_align)
    monkeypatch.setattr(poolers, "multilevel_roi_pool", spy_pool)
    config = tiny_model_config(roi_pooler=pooler)
    images, sizes = random_images(batch=1)
    MaskRCNN(config).init(jax.random.key(0), images, sizes, method=MaskRCNN.initialize)
    expected = {"align": ("align", False), "align_v2": ("align", True), "pool": ("pool", None)}
    assert calls == [expected[pooler]] * 2  # box head, mask head


def test_ablation_settings_are_validated():
    c = get_model_config()
    assert (c.roi_pooler, c.mask_loss, c.class_agnostic_mask) == ("align", "sigmoid", False)
    for field, bad, valid in [
        ("roi_pooler", "roi_pool", poolers.ROI_POOLERS),
        ("mask_loss", "focal", losses.MASK_LOSSES),
        ("class_agnostic_mask", "yes", (False, True)),
    ]:
        with pytest.raises((ValueError, TypeError)) as e:
            get_model_config(**{field: bad})
        msg = str(e.value)
        assert "\n" not in msg and field in msg, msg
        if e.type is ValueError:
            assert all(repr(v) in msg for v in valid), msg
    with pytest.raises(ValueError, match="softmax.*class_agnostic_mask") as e:
        get_model_config(mask_loss="softmax", class_agnostic_mask=True)
    assert "\n" not in str(e.value)
