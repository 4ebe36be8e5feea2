import torch

from mkfast.data.digits import DIGIT_NAMES, load_digits_pairs


def test_digits_pairs_are_disjoint_fixed_splits_with_matching_captions():
    train, held_out = load_digits_pairs(image_size=24, held_out_fraction=0.25, seed=3)
    assert len(train) + len(held_out) == 1797
    assert train.images.shape[1:] == (3, 24, 24)
    assert float(train.images.min()) >= 0.0 and float(train.images.max()) <= 1.0
    for label, caption in zip(held_out.labels.tolist(), held_out.captions, strict=True):
        assert caption.endswith(DIGIT_NAMES[label])
    again, _ = load_digits_pairs(image_size=24, held_out_fraction=0.25, seed=3)
    assert torch.equal(train.images, again.images)
    assert len(held_out) == round(0.25 * 1797)
