"""Loss functions equal torchvision's on identical inputs and sampled indices.

Tolerances: a float32 sum of N terms, computed in another order (torch, or XLA
on another CPU), may differ by about N * 2^-24 relative (``sum_rtol``); an
element-wise formula by a few roundings.
"""

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torchvision.models.detection import roi_heads as tv_roi_heads
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
from torchvision.models.detection.rpn import RegionProposalNetwork

from maskrcnn_jax import losses

U = 2.0**-24  # float32 unit roundoff


def sum_rtol(n: int) -> float:
    """Relative tolerance of a float32 sum of ``n`` terms (plus a few roundings)."""
    return (n + 4) * U


def test_smooth_l1_beta_zero_is_l1():
    x = jnp.array([-2.0, -0.05, 0.0, 0.05, 3.0])
    # beta=0 is |x - 0|: exact.
    np.testing.assert_array_equal(losses.smooth_l1(x, 0.0, 0.0), jnp.abs(x))
    ref = torch.nn.functional.smooth_l1_loss(torch.tensor(np.asarray(x)), torch.zeros(5), beta=1 / 9, reduction="none")
    # Element-wise: 0.5 * d^2 / beta or d - beta / 2, at most 4 roundings each
    # side: within 8 * 2^-24 = 4.8e-7 relative.
    np.testing.assert_allclose(losses.smooth_l1(x, 0.0, 1 / 9), ref.numpy(), rtol=1e-6)


def test_rpn_loss_matches_torchvision():
    rng = np.random.default_rng(0)
    b, a = 2, 400
    obj = rng.normal(size=(b, a)).astype(np.float32)
    deltas = rng.normal(size=(b, a, 4)).astype(np.float32)
    tgt = rng.normal(size=(b, a, 4)).astype(np.float32)
    # Few enough labelled anchors that torchvision's sampler takes all of them,
    # so both sides see the same sampled set.
    labels = np.full((b, a), -1.0, np.float32)
    for i in range(b):
        idx = rng.permutation(a)
        labels[i, idx[:20]] = 1
        labels[i, idx[20:120]] = 0
    rpn = RegionProposalNetwork.__new__(RegionProposalNetwork)
    torch.nn.Module.__init__(rpn)
    rpn.fg_bg_sampler = BalancedPositiveNegativeSampler(256, 0.5)
    ref_obj, ref_box = rpn.compute_loss(
        torch.from_numpy(obj.reshape(-1, 1)),
        torch.from_numpy(deltas.reshape(-1, 4)),
        [torch.from_numpy(l) for l in labels],
        [torch.from_numpy(t) for t in tgt],
    )
    ours_obj, ours_box = jax.jit(losses.rpn_loss)(obj, deltas, labels == 1, labels == 0, np.where(labels[..., None] == 1, tgt, 0))
    np.testing.assert_allclose(ours_obj, ref_obj.item(), rtol=sum_rtol(b * a))
    np.testing.assert_allclose(ours_box, ref_box.item(), rtol=sum_rtol(b * a * 4))


def test_box_head_loss_matches_fastrcnn_loss():
    rng = np.random.default_rng(1)
    b, s, k = 2, 64, 5
    logits = rng.normal(size=(b, s, k)).astype(np.float32)
    deltas = rng.normal(size=(b, s, k, 4)).astype(np.float32)
    labels = rng.integers(0, k, size=(b, s)).astype(np.int64)
    labels[:, 40:] = 0
    tgt = rng.normal(size=(b, s, 4)).astype(np.float32)
    tgt[labels == 0] = 0
    ref_cls, ref_box = tv_roi_heads.fastrcnn_loss(
        torch.from_numpy(logits.reshape(-1, k)),
        torch.from_numpy(deltas.reshape(-1, k * 4)),
        [torch.from_numpy(l) for l in labels],
        [torch.from_numpy(t) for t in tgt],
    )
    valid = np.ones((b, s), bool)
    cls, box = losses.box_head_loss(logits, deltas, labels.astype(np.int32), tgt, valid)
    np.testing.assert_allclose(cls, ref_cls.item(), rtol=sum_rtol(b * s * k))  # log-sum-exp too
    np.testing.assert_allclose(box, ref_box.item(), rtol=sum_rtol(b * s * 4))
    # Unsampled slots change nothing.
    pad = lambda x, v=0: np.concatenate([x, np.full((b, 7) + x.shape[2:], v, x.dtype)], axis=1)
    cls2, box2 = losses.box_head_loss(pad(logits, 50.0), pad(deltas, 9.0), pad(labels.astype(np.int32), 1), pad(tgt), pad(valid, False))
    # Zeros added to the sums, but their length (and so XLA's order) changes.
    np.testing.assert_allclose([cls2, box2], [cls, box], rtol=sum_rtol(b * (s + 7) * 4))


def test_mask_loss_matches_maskrcnn_loss():
    rng = np.random.default_rng(2)
    n, k, m = 6, 4, 28
    logits = rng.normal(size=(n, k, m, m)).astype(np.float32)
    gt_labels = rng.integers(1, k, size=n)
    # torchvision builds targets by RoIAlign of full masks; build them the same
    # way and hand the identical targets to ours.
    gt_masks = (rng.uniform(size=(3, 64, 64)) > 0.5).astype(np.float32)
    proposals = np.array([[4, 4, 40, 40], [10, 0, 60, 30], [0, 0, 63, 63], [20, 20, 30, 50], [5, 9, 33, 60], [1, 2, 3, 4]], np.float32)
    matched = np.array([0, 1, 2, 0, 1, 2])
    labels_img = gt_labels[:3]  # label of each ground-truth instance
    ref = tv_roi_heads.maskrcnn_loss(
        torch.from_numpy(logits), [torch.from_numpy(proposals)], [torch.from_numpy(gt_masks)],
        [torch.from_numpy(labels_img)], [torch.from_numpy(matched)],
    )
    tgt = tv_roi_heads.project_masks_on_boxes(torch.from_numpy(gt_masks), torch.from_numpy(proposals), torch.from_numpy(matched), m).numpy()
    roi_labels = labels_img[matched]  # torchvision reads the label of the matched instance
    ours = losses.mask_loss(np.transpose(logits, (0, 2, 3, 1))[None], roi_labels[None].astype(np.int32), tgt[None], np.ones((1, n), bool))
    np.testing.assert_allclose(ours, ref.item(), rtol=sum_rtol(n * m * m))


def test_mask_loss_only_uses_ground_truth_channel_and_empty_is_zero():
    logits = jnp.zeros((1, 2, 28, 28, 3)).at[..., 2].set(100.0)  # other class very wrong
    tgt = jnp.zeros((1, 2, 28, 28))
    labels = jnp.array([[1, 1]])
    loss = losses.mask_loss(logits, labels, tgt, jnp.array([[True, True]]))
    # A float32 mean of 2 x 28 x 28 equal terms log(2): the running sum rounds
    # up to once per term, so up to 1568 * 2^-24 = 9.3e-5 relative (1.4e-6 seen).
    np.testing.assert_allclose(loss, np.log(2.0), rtol=sum_rtol(2 * 28 * 28))
    empty = jax.grad(lambda x: losses.mask_loss(x, labels, tgt, jnp.array([[False, False]])))(logits)
    assert float(jnp.abs(empty).sum()) == 0.0


# Softmax ("multinomial") and class-agnostic masks, the paper's Table 2b
# ablations. The losses are float32 means over n = N * M * M pixel terms; the
# guide's bound for such a sum differing between implementations is ~n * 6e-8
# relative (each term itself is a log-softmax of a few terms, a few ulp).


def _mask_case(seed, n=6, k=4, m=28, binary=False):
    """torchvision-built mask targets for n RoIs (soft, or binarised at 0.5)."""
    rng = np.random.default_rng(seed)
    logits = (3 * rng.normal(size=(n, k, m, m))).astype(np.float32)
    gt_masks = (rng.uniform(size=(3, 64, 64)) > 0.5).astype(np.float32)
    proposals = rng.uniform(0, 40, size=(n, 2))
    proposals = np.concatenate([proposals, proposals + rng.uniform(3, 30, (n, 2))], 1)
    matched = np.arange(n) % 3
    tgt = tv_roi_heads.project_masks_on_boxes(
        torch.from_numpy(gt_masks),
        torch.from_numpy(proposals.astype(np.float32)),
        torch.from_numpy(matched),
        m,
    ).numpy()
    if binary:
        tgt = (tgt >= 0.5).astype(np.float32)
    labels = rng.integers(1, k, size=3)[matched] if k > 1 else np.zeros(n, np.int64)
    return logits, labels, tgt


def _ours_nhwc(logits):
    return jnp.asarray(np.transpose(logits, (0, 2, 3, 1))[None])


def test_softmax_mask_loss_binary_targets_match_cross_entropy_on_class_map():
    logits, labels, tgt = _mask_case(10, binary=True)
    n = logits.shape[0]
    # The paper's target: the RoI's class where the mask is, background (0) elsewhere.
    class_map = torch.from_numpy(labels[:, None, None] * tgt.astype(np.int64))
    tl = torch.from_numpy(logits).requires_grad_(True)
    ref = torch.nn.functional.cross_entropy(tl, class_map)
    ref.backward()
    rtol = tgt.size * 6e-8

    def loss(x):
        lab = labels[None].astype(np.int32)
        return losses.softmax_mask_loss(x, lab, tgt[None], np.ones((1, n), bool))

    ours, grad = jax.value_and_grad(loss)(_ours_nhwc(logits))
    np.testing.assert_allclose(ours, ref.item(), rtol=rtol)
    # Per element (softmax - onehot) / n_pixels: a few ulp of values <= 1 / n_pixels.
    ref_grad = np.transpose(tl.grad.numpy(), (0, 2, 3, 1))
    np.testing.assert_allclose(grad[0], ref_grad, rtol=0, atol=16 * 2.0**-24 / tgt.size)


def test_softmax_mask_loss_soft_targets_match_cross_entropy_on_probabilities():
    logits, labels, tgt = _mask_case(11)
    n = logits.shape[0]
    assert 0 < np.mean((tgt > 0) & (tgt < 1))  # some targets really are soft
    # Target distribution per pixel: t on the RoI's class, 1 - t on background.
    probs = np.zeros_like(logits)
    probs[:, 0] = 1 - tgt
    probs[np.arange(n), labels] += tgt
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(probs))
    ours = losses.softmax_mask_loss(
        _ours_nhwc(logits), labels[None].astype(np.int32), tgt[None], np.ones((1, n), bool)
    )
    np.testing.assert_allclose(ours, ref.item(), rtol=tgt.size * 6e-8)


def test_softmax_mask_loss_with_two_classes_is_the_sigmoid_loss():
    # softmax over (z0, z1) = sigmoid(z1 - z0): with one class the two losses
    # coincide, so the ablation changes only the competition between classes.
    logits, labels, tgt = _mask_case(12, k=2)
    n = logits.shape[0]
    lab = labels[None].astype(np.int32)
    pos = np.ones((1, n), bool)
    soft = losses.softmax_mask_loss(_ours_nhwc(logits), lab, tgt[None], pos)
    diff = _ours_nhwc(logits[:, 1:] - logits[:, :1])  # [1, n, M, M, 1]
    sig = losses.mask_loss(diff, np.zeros_like(lab), tgt[None], pos)
    np.testing.assert_allclose(soft, sig, rtol=tgt.size * 6e-8)


def test_softmax_mask_loss_ignores_unsampled_rois_and_empty_is_zero():
    logits, labels, tgt = _mask_case(13)
    n = logits.shape[0]
    x, lab, t = _ours_nhwc(logits), labels[None].astype(np.int32), tgt[None]
    pos = np.array([[True, False, True, True, False, True]])
    ours = losses.softmax_mask_loss(x, lab, t, pos)
    keep = pos[0]
    only = np.ones((1, keep.sum()), bool)
    ref = losses.softmax_mask_loss(x[:, keep], lab[:, keep], t[:, keep], only)
    # The same nonzero terms, but summed in arrays of different shapes, so XLA may
    # order the float32 reduction differently: N * 6e-8 relative over N terms.
    np.testing.assert_allclose(ours, ref, rtol=t[:, keep].size * 6e-8)
    none = np.zeros((1, n), bool)
    assert float(losses.softmax_mask_loss(x, lab, t, none)) == 0.0
    g = jax.grad(lambda v: losses.softmax_mask_loss(v, lab, t, none))(x)
    assert float(jnp.abs(g).sum()) == 0.0


def test_class_agnostic_mask_loss_matches_bce_on_the_single_channel():
    logits, _, tgt = _mask_case(14, k=1)
    n = logits.shape[0]
    tl = torch.from_numpy(logits).requires_grad_(True)
    # Detectron2's mask_rcnn_loss with cls_agnostic_mask: channel 0 for every RoI.
    ref = torch.nn.functional.binary_cross_entropy_with_logits(tl[:, 0], torch.from_numpy(tgt))
    ref.backward()

    def loss(x):
        return losses.class_agnostic_mask_loss(x, tgt[None], np.ones((1, n), bool))

    ours, grad = jax.value_and_grad(loss)(_ours_nhwc(logits))
    np.testing.assert_allclose(ours, ref.item(), rtol=tgt.size * 6e-8)
    ref_grad = np.transpose(tl.grad.numpy(), (0, 2, 3, 1))
    np.testing.assert_allclose(grad[0], ref_grad, rtol=0, atol=16 * 2.0**-24 / tgt.size)
    none = np.zeros((1, n), bool)
    assert float(losses.class_agnostic_mask_loss(_ours_nhwc(logits), tgt[None], none)) == 0.0


def test_class_agnostic_mask_loss_refuses_per_class_logits():
    import pytest  # local: this block is appended to the file, imports untouched

    with pytest.raises(ValueError, match="1 channel"):
        losses.class_agnostic_mask_loss(
            jnp.zeros((1, 2, 28, 28, 3)), jnp.zeros((1, 2, 28, 28)), jnp.ones((1, 2), bool)
        )
