"""Batched augmentation ops, checked on values against padding and slicing done the obvious way."""

import pytest
import torch
import torch.nn.functional as F

from resnets.data.augment import Augment, crop_at, cutout_at, flip_where, hflip, normalize


def _images(n=6, c=3, h=8, w=8, seed=0):
    # Distinct random pixels, so a crop can be matched to exactly one offset.
    return torch.randint(
        0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_crop_at_equals_pad_then_slice(mode):
    x = _images()
    p = 3
    padded = F.pad(x.float(), (p, p, p, p), mode="constant" if mode == "zeros" else "reflect")
    dy = torch.tensor([-3, -1, 0, 2, 3, 1])
    dx = torch.tensor([3, 0, -2, -3, 1, 2])
    out = crop_at(x, dy, dx, mode)
    assert out.shape == x.shape and out.dtype == torch.uint8
    for i in range(len(x)):
        oy, ox = p + dy[i].item(), p + dx[i].item()
        assert torch.equal(out[i].float(), padded[i, :, oy : oy + 8, ox : ox + 8]), (mode, i)


def test_zero_shift_is_identity():
    x = _images()
    z = torch.zeros(len(x), dtype=torch.long)
    assert torch.equal(crop_at(x, z, z, "zeros"), x)
    assert torch.equal(crop_at(x, z, z, "reflect"), x)


def test_random_crop_offsets_stay_within_padding():
    x = _images(n=32)
    p = 2
    aug = Augment(padding=p, pad_mode="zeros", flip=False)
    gen = torch.Generator().manual_seed(1)
    params = aug.draw(len(x), 8, 8, gen)
    out = aug.apply(x, params, mean=(0.0,) * 3, std=(1 / 255,) * 3)  # normalisation = identity on 0..255
    padded = F.pad(x.float(), (p, p, p, p))
    seen = set()
    for i in range(len(x)):
        matches = [
            (oy, ox)
            for oy in range(2 * p + 1)
            for ox in range(2 * p + 1)
            if torch.equal(out[i], padded[i, :, oy : oy + 8, ox : ox + 8])
        ]
        assert matches == [(p + params["dy"][i].item(), p + params["dx"][i].item())]
        seen.add(matches[0])
    assert len(seen) > 5  # the offsets really vary


def test_flip_twice_is_identity_and_mask_flips_only_chosen_images():
    x = _images()
    assert torch.equal(hflip(hflip(x)), x)
    assert not torch.equal(hflip(x), x)
    assert torch.equal(hflip(x)[..., 0], x[..., -1])
    mask = torch.tensor([True, False, True, False, False, True])
    y = flip_where(x, mask)
    for i in range(len(x)):
        assert torch.equal(y[i], x[i].flip(-1) if mask[i] else x[i])
    assert torch.equal(flip_where(y, mask), x)


def test_cutout_zeroes_exactly_the_square_clipped_at_the_border():
    x = torch.ones(2, 3, 10, 10)
    out = cutout_at(x, torch.tensor([5, 0]), torch.tensor([4, 9]), size=4)
    expected = torch.ones(2, 3, 10, 10)
    expected[0, :, 3:7, 2:6] = 0  # centre (5, 4), side 4: rows 3..6, cols 2..5
    expected[1, :, 0:2, 7:10] = 0  # centre (0, 9): rows -2..1, cols 7..10, clipped
    assert torch.equal(out, expected)
    assert (out[0] == 0).sum() == 3 * 16 and (out[1] == 0).sum() == 3 * 6


def test_normalize_values():
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # 1 image, 2 channels, 1x2
    out = normalize(x, mean=(0.5, 0.2), std=(0.25, 0.2))
    expected = torch.tensor([[[[-2.0, 2.0]], [[0.0, 1.0]]]])
    torch.testing.assert_close(out, expected)


def test_augment_is_a_function_of_the_generator_seed():
    x = _images(n=16)
    aug = Augment(padding=2, pad_mode="reflect", flip=True, cutout=3)

    def run(seed):
        params = aug.draw(len(x), 8, 8, torch.Generator().manual_seed(seed))
        return aug.apply(x, params, (0.5,) * 3, (0.25,) * 3)

    assert torch.equal(run(3), run(3))
    assert not torch.equal(run(3), run(4))


def test_reflection_padding_larger_than_image_is_refused():
    with pytest.raises(ValueError, match="reflection padding"):
        Augment(padding=8, pad_mode="reflect").draw(2, 8, 8, torch.Generator())
